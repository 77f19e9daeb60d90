//! The release binaries (`ingest`, `scheduler`, `correlator`) started as their own OS
//! processes, each configured through its environment as a deployment would be, for process
//! mode ([`crate::procs`]) and the soak ([`crate::soak`]).
//!
//! The binaries come from `LC_BENCH_BIN_DIR` when set (a directory holding all three), else
//! from `cargo build --release --bins` of the service crates, run first so they are never
//! older than the source the bench was built from. Every child is killed when its handle is
//! dropped (`kill_on_drop`), also when the bench panics, so no run leaves services behind.
//! Children inherit the bench's scheduling priority: a `nice`d bench measures `nice`d services.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::env::{APP_SECRET, BenchEnv};
use crate::proc_stats::{ProcStats, ProcStatsError};

/// Environment variable naming a directory with the three release binaries (skips the build).
pub const BIN_DIR_VAR: &str = "LC_BENCH_BIN_DIR";

/// Environment variable with whitespace-separated `NAME=value` pairs added to the scheduler's
/// environment (e.g. `MALLOC_ARENA_MAX=2`, or heaptrack's `LD_PRELOAD` and
/// `DUMP_HEAPTRACK_OUTPUT`), for A/B runs of one binary under different settings. Not set on
/// the bench itself, so a preload there would not also profile the bench.
pub const SCHEDULER_ENV_VAR: &str = "LC_BENCH_SCHEDULER_ENV";

/// One of the services process mode starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// The webhook receiver.
    Ingest,
    /// The first-message sender.
    Scheduler,
    /// The reply correlator.
    Correlator,
}

impl Service {
    /// All three, in start order.
    pub const ALL: [Service; 3] = [Self::Ingest, Self::Scheduler, Self::Correlator];

    /// The binary's file name (also the figure prefix).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Scheduler => "scheduler",
            Self::Correlator => "correlator",
        }
    }
}

/// What went wrong starting or reading a service process.
#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    /// `cargo build` could not be run or failed.
    #[error(
        "building the release binaries failed: {0}; build them with `cargo build --release --bins` \
         or point {BIN_DIR_VAR} at a directory holding ingest, scheduler and correlator"
    )]
    Build(String),
    /// A binary is not where it was expected.
    #[error("{0} not found; set {BIN_DIR_VAR} to the directory of the release binaries")]
    Missing(PathBuf),
    /// The process could not be started.
    #[error("cannot start {service} ({path}): {source}")]
    Spawn {
        /// The service.
        service: &'static str,
        /// Its binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The process exited or never answered `/readyz` with 200.
    #[error("{service} did not become ready: {why}; the end of its log:\n{log_tail}")]
    NotReady {
        /// The service.
        service: &'static str,
        /// Exited (with what status) or timed out.
        why: String,
        /// The last lines it wrote.
        log_tail: String,
    },
    /// A log file or a free port could not be had.
    #[error("setting up {what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Its `/proc` figures could not be read.
    #[error(transparent)]
    Stats(#[from] ProcStatsError),
}

/// Paths of the three release binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    ingest: PathBuf,
    scheduler: PathBuf,
    correlator: PathBuf,
    /// Where they came from, for the report.
    origin: String,
}

impl Binaries {
    /// From `LC_BENCH_BIN_DIR`, or built with cargo (see the module docs).
    pub async fn locate() -> Result<Self, ChildError> {
        let bins = match std::env::var_os(BIN_DIR_VAR) {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                Self {
                    ingest: dir.join("ingest"),
                    scheduler: dir.join("scheduler"),
                    correlator: dir.join("correlator"),
                    origin: format!("{BIN_DIR_VAR}={}", dir.display()),
                }
            }
            None => build().await?,
        };
        for s in Service::ALL {
            if !bins.path(s).is_file() {
                return Err(ChildError::Missing(bins.path(s).to_owned()));
            }
        }
        Ok(bins)
    }

    /// Where the binaries came from (`cargo build --release` or `LC_BENCH_BIN_DIR=…`).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The binary of `service`.
    pub fn path(&self, service: Service) -> &Path {
        match service {
            Service::Ingest => &self.ingest,
            Service::Scheduler => &self.scheduler,
            Service::Correlator => &self.correlator,
        }
    }
}

/// `cargo build --release --bins` of the service crates; the executables are read from
/// cargo's JSON messages, so whatever target directory cargo uses is found.
async fn build() -> Result<Binaries, ChildError> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    eprintln!("building the release binaries (cargo build --release --bins)…");
    let out = Command::new(cargo)
        .args(["build", "--release", "--bins", "--manifest-path", manifest])
        // With the bench itself in the set, features unify as in `cargo run --release -p
        // bench`, so this build reuses its dependencies instead of rebuilding them.
        .args([
            "-p",
            "bench",
            "-p",
            "loginconnect-ingest",
            "-p",
            "loginconnect-worker",
        ])
        .args(["--message-format", "json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| ChildError::Build(format!("cannot run cargo: {e}")))?;
    if !out.status.success() {
        return Err(ChildError::Build(format!(
            "cargo exited with {}",
            out.status
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let find = |name: &str| {
        executable_of(&stdout, name)
            .ok_or_else(|| ChildError::Build(format!("cargo reported no executable named {name}")))
    };
    let ingest = find("ingest")?;
    let origin = format!(
        "cargo build --release ({})",
        ingest
            .parent()
            .map(Path::display)
            .map(|d| d.to_string())
            .unwrap_or_default()
    );
    Ok(Binaries {
        scheduler: find("scheduler")?,
        correlator: find("correlator")?,
        ingest,
        origin,
    })
}

/// The `executable` of the binary target `name` in cargo's JSON messages.
fn executable_of(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// A service running as a child process; killed on drop, its log file removed.
pub struct ServiceProc {
    /// Which service.
    pub service: Service,
    /// Its process id.
    pub pid: u32,
    /// Where `/readyz` is served.
    pub admin: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl ServiceProc {
    /// Starts `bin` with exactly `vars` (plus `PATH`, and `RUST_LOG` when the bench has it)
    /// as its environment, writing stdout and stderr to `log`.
    pub fn spawn(
        service: Service,
        bin: &Path,
        vars: &[(&str, String)],
        admin: SocketAddr,
        log: PathBuf,
    ) -> Result<Self, ChildError> {
        let io = |what: &str, source| ChildError::Io {
            what: format!("{what} of {}", service.name()),
            source,
        };
        let file = std::fs::File::create(&log).map_err(|e| io("the log file", e))?;
        let err_file = file.try_clone().map_err(|e| io("the log file", e))?;
        let mut cmd = Command::new(bin);
        // Only what the service is given, so the shell's own AMQP_URL or DATABASE_URL cannot
        // leak into a run.
        cmd.env_clear()
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .kill_on_drop(true);
        for inherited in ["PATH", "RUST_LOG"] {
            if let Some(v) = std::env::var_os(inherited) {
                cmd.env(inherited, v);
            }
        }
        if service == Service::Scheduler
            && let Ok(extra) = std::env::var(SCHEDULER_ENV_VAR)
        {
            cmd.envs(env_pairs(&extra));
        }
        let child = cmd.spawn().map_err(|source| ChildError::Spawn {
            service: service.name(),
            path: bin.to_owned(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| ChildError::NotReady {
            service: service.name(),
            why: "exited at once".into(),
            log_tail: String::new(),
        })?;
        Ok(Self {
            service,
            pid,
            admin,
            child,
            log,
        })
    }

    /// Polls `/readyz` until it answers 200; fails when the process exits or `limit` passes.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<(), ChildError> {
        let url = format!("http://{}/readyz", self.admin);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.not_ready(format!("exited with {status}")));
            }
            let ready = client
                .get(&url)
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("no 200 from {url} within {limit:?}")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its resident memory and CPU time now.
    pub fn stats(&self) -> Result<ProcStats, ChildError> {
        Ok(crate::proc_stats::read(self.pid)?)
    }

    fn not_ready(&self, why: String) -> ChildError {
        ChildError::NotReady {
            service: self.service.name(),
            why,
            log_tail: tail(&self.log, 2000),
        }
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL when `child` drops right after this.
        let _ = self.child.start_kill();
        // LC_BENCH_KEEP_LOGS=1 keeps the services' logs (their paths are printed) to find
        // out what a slow or failed run was doing.
        if std::env::var_os("LC_BENCH_KEEP_LOGS").is_some() {
            eprintln!(
                "kept the log of {}: {}",
                self.service.name(),
                self.log.display()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The `NAME=value` pairs of a whitespace-separated list (words without `=` are skipped).
fn env_pairs(list: &str) -> Vec<(&str, &str)> {
    list.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// The last `max` bytes of a file (lossy), for error messages.
fn tail(path: &Path, max: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// A free TCP port on 127.0.0.1 (bound and released: a service binds it a moment later).
pub fn free_addr() -> Result<SocketAddr, ChildError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| ChildError::Io {
            what: "a free port".into(),
            source,
        })
}

/// The three services of one run, each its own process, on one [`BenchEnv`].
pub struct Services {
    /// ingest, scheduler, correlator (in [`Service::ALL`] order).
    pub procs: Vec<ServiceProc>,
    /// `http://…/webhook` of ingest.
    pub webhook_url: String,
}

impl Services {
    /// Starts all three against `env` (its database must be migrated already, so the two
    /// workers do not race to migrate it) with the Graph at `graph_url`; `scheduler_extra`
    /// adds settings of the scheduler (e.g. `OPTIN_RETENTION_SECS`). Waits until every one
    /// answers `/readyz`.
    pub async fn start(
        env: &BenchEnv,
        bins: &Binaries,
        graph_url: &str,
        scheduler_extra: &[(&str, String)],
    ) -> Result<Self, ChildError> {
        let amqp = env.vhost.url();
        let db = env.db.url();
        let listen = free_addr()?;
        let mut procs = Vec::new();
        for service in Service::ALL {
            let admin = free_addr()?;
            let mut vars: Vec<(&str, String)> = vec![("AMQP_URL", amqp.clone())];
            match service {
                Service::Ingest => vars.extend([
                    ("INGEST_ADDR", listen.to_string()),
                    ("INGEST_ADMIN_ADDR", admin.to_string()),
                    ("META_APP_SECRETS", APP_SECRET.to_owned()),
                    ("META_VERIFY_TOKEN", "bench-verify".to_owned()),
                ]),
                Service::Scheduler => {
                    vars.extend([
                        ("METRICS_ADDR", admin.to_string()),
                        ("DATABASE_URL", db.clone()),
                        ("PAGES_FILE", env.pages_file.display().to_string()),
                        ("GRAPH_API_URL", graph_url.to_owned()),
                    ]);
                    vars.extend(scheduler_extra.iter().cloned());
                }
                Service::Correlator => vars.extend([
                    ("METRICS_ADDR", admin.to_string()),
                    ("DATABASE_URL", db.clone()),
                ]),
            }
            let log = std::env::temp_dir().join(format!("{}-{}.log", env.db.name, service.name()));
            let mut p = ServiceProc::spawn(service, bins.path(service), &vars, admin, log)?;
            p.wait_ready(Duration::from_secs(60)).await?;
            procs.push(p);
        }
        Ok(Self {
            procs,
            webhook_url: format!("http://{listen}/webhook"),
        })
    }

    /// Each service's figures now, in [`Service::ALL`] order.
    pub fn stats(&self) -> Result<Vec<(Service, ProcStats)>, ChildError> {
        self.procs
            .iter()
            .map(|p| Ok((p.service, p.stats()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_executables_in_cargo_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"lc_ingest","kind":["lib"]},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"name":"ingest","kind":["bin"]},"executable":"/t/release/ingest"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#
        );
        assert_eq!(
            executable_of(messages, "ingest"),
            Some(PathBuf::from("/t/release/ingest"))
        );
        assert_eq!(executable_of(messages, "scheduler"), None);
    }

    #[test]
    fn scheduler_env_pairs() {
        assert_eq!(
            env_pairs(" MALLOC_ARENA_MAX=2  LD_PRELOAD=/a/b.so=x junk =1 "),
            [("MALLOC_ARENA_MAX", "2"), ("LD_PRELOAD", "/a/b.so=x")]
        );
    }
}
