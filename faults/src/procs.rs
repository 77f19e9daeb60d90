//! The fleet: the real `ingest`, `scheduler` and `correlator` binaries as child processes,
//! killed with SIGKILL and restarted by the fault loop.
//!
//! Each process logs to its own file in the run directory (appended across restarts), so a
//! violation's timeline can be followed in the logs of the process that caused it.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// What a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The webhook endpoint.
    Ingest,
    /// First messages.
    Scheduler,
    /// Links.
    Correlator,
}

impl Role {
    /// The binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Scheduler => "scheduler",
            Self::Correlator => "correlator",
        }
    }
}

/// One process slot: restarted in place after each kill.
pub struct Proc {
    /// Its role.
    pub role: Role,
    /// Its number among its role (1-based), used in names.
    pub index: usize,
    /// The port it listens on (ingest's HTTP port, or a worker's metrics port).
    pub port: u16,
    /// The running child.
    child: Option<Child>,
    /// When the current child was started.
    pub started: Instant,
    /// Generation of the pages file the current child has loaded (schedulers).
    pub pages_generation: u64,
    /// How many times it was started.
    pub starts: u32,
}

impl Proc {
    /// `scheduler-2` and so on.
    pub fn name(&self) -> String {
        format!("{}-{}", self.role.binary(), self.index)
    }

    /// The OS process id of the current child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

/// How to start every process.
pub struct FleetConfig {
    /// Directory of the binaries.
    pub bin_dir: PathBuf,
    /// Directory of the log files.
    pub log_dir: PathBuf,
    /// Environment of every process.
    pub common: Vec<(String, String)>,
    /// Environment of ingest only.
    pub ingest: Vec<(String, String)>,
    /// Environment of the schedulers only.
    pub scheduler: Vec<(String, String)>,
    /// Environment of the correlators only.
    pub correlator: Vec<(String, String)>,
}

/// All processes of the run.
pub struct Fleet {
    config: FleetConfig,
    /// The slots.
    pub procs: Vec<Proc>,
    /// Exits the suite did not cause (a crash of the product), with what was seen.
    pub unexpected_exits: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (bound and released; the child binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a free port")?;
    Ok(l.local_addr()?.port())
}

impl Fleet {
    /// Starts `ingests` ingest processes, `schedulers` schedulers and two correlators, and
    /// waits until all are ready.
    pub async fn start(
        config: FleetConfig,
        ingests: usize,
        schedulers: usize,
    ) -> anyhow::Result<Self> {
        let mut fleet = Self {
            config,
            procs: Vec::new(),
            unexpected_exits: Vec::new(),
        };
        let roles = std::iter::repeat_n(Role::Ingest, ingests)
            .chain(std::iter::repeat_n(Role::Scheduler, schedulers))
            .chain([Role::Correlator, Role::Correlator]);
        let mut counts = [0usize; 3];
        for role in roles {
            let slot = role as usize;
            counts[slot] += 1;
            fleet.procs.push(Proc {
                role,
                index: counts[slot],
                port: free_port()?,
                child: None,
                started: Instant::now(),
                pages_generation: 0,
                starts: 0,
            });
        }
        for i in 0..fleet.procs.len() {
            fleet.spawn(i, 0)?;
        }
        for i in 0..fleet.procs.len() {
            fleet.wait_ready(i, Duration::from_secs(90)).await?;
        }
        Ok(fleet)
    }

    /// Starts slot `i`; `pages_generation` is the pages file's generation at this moment.
    pub fn spawn(&mut self, i: usize, pages_generation: u64) -> anyhow::Result<()> {
        let p = &mut self.procs[i];
        let name = p.name();
        let log_path = self.config.log_dir.join(format!("{name}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let err = log.try_clone()?;
        let mut cmd = Command::new(self.config.bin_dir.join(p.role.binary()));
        cmd.envs(self.config.common.iter().cloned());
        let addr = format!("127.0.0.1:{}", p.port);
        match p.role {
            Role::Ingest => {
                cmd.envs(self.config.ingest.iter().cloned());
                cmd.env("INGEST_ADDR", &addr);
                // Its metrics listener: a port of its own, so several ingests run side by
                // side (the default, 127.0.0.1:9465, would be taken by the first).
                cmd.env("INGEST_ADMIN_ADDR", format!("127.0.0.1:{}", free_port()?));
            }
            Role::Scheduler => {
                cmd.envs(self.config.scheduler.iter().cloned());
                cmd.env("METRICS_ADDR", &addr);
            }
            Role::Correlator => {
                cmd.envs(self.config.correlator.iter().cloned());
                cmd.env("METRICS_ADDR", &addr);
            }
        }
        if p.role != Role::Ingest {
            cmd.env("WORKER_ID", format!("{name}.{}", p.starts + 1));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {} (build it first: cargo build --bins)",
                self.config.bin_dir.join(p.role.binary()).display()
            )
        })?;
        p.child = Some(child);
        p.started = Instant::now();
        p.pages_generation = pages_generation;
        p.starts += 1;
        Ok(())
    }

    /// Waits until slot `i` answers `/readyz` with 200.
    pub async fn wait_ready(&mut self, i: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.is_ready(i).await {
                return Ok(());
            }
            if let Some(child) = self.procs[i].child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                anyhow::bail!(
                    "{} exited during start-up ({status}); see {}",
                    self.procs[i].name(),
                    self.config
                        .log_dir
                        .join(format!("{}.log", self.procs[i].name()))
                        .display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("{} not ready within {timeout:?}", self.procs[i].name())
    }

    /// True when slot `i` answers `/readyz` with 200 right now.
    pub async fn is_ready(&self, i: usize) -> bool {
        let url = format!("http://127.0.0.1:{}/readyz", self.procs[i].port);
        let client = reqwest::Client::new();
        matches!(
            client.get(url).timeout(Duration::from_millis(500)).send().await,
            Ok(r) if r.status().is_success()
        )
    }

    /// SIGKILL of slot `i` (waits until the process is gone).
    pub async fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.procs[i].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Sends a signal (by name, e.g. `HUP`) to slot `i`'s process.
    pub fn signal(&self, i: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self.procs[i]
            .pid()
            .context("process not running")?
            .to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} {pid} failed");
        Ok(())
    }

    /// Restarts every process that exited without the suite killing it, recording the exit.
    pub fn reap_unexpected(&mut self, pages_generation: u64) -> anyhow::Result<()> {
        for i in 0..self.procs.len() {
            let exited = match self.procs[i].child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = exited {
                let what = format!(
                    "{} exited by itself ({status}) after {:.1}s",
                    self.procs[i].name(),
                    self.procs[i].started.elapsed().as_secs_f64()
                );
                println!("  !! {what}");
                self.unexpected_exits.push(what);
                self.procs[i].child = None;
                self.spawn(i, pages_generation)?;
            }
        }
        Ok(())
    }

    /// Indexes of the slots with this role.
    pub fn of_role(&self, role: Role) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|i| self.procs[*i].role == role)
            .collect()
    }

    /// The sum of a counter or gauge (`name`, without labels) over the `/metrics` of every
    /// running process of `role` (workers only: ingest serves its metrics on an admin port
    /// this fleet does not track) (a restarted process counts from zero again); `None` if no
    /// process answered.
    pub async fn metric_sum(&self, role: Role, name: &str) -> Option<f64> {
        let client = reqwest::Client::new();
        let mut sum = None;
        for i in self.of_role(role) {
            let url = format!("http://127.0.0.1:{}/metrics", self.procs[i].port);
            let Ok(answer) = client.get(url).timeout(Duration::from_secs(2)).send().await else {
                continue;
            };
            let Ok(text) = answer.text().await else {
                continue;
            };
            let value: f64 = text
                .lines()
                .filter_map(|l| l.strip_prefix(name))
                .filter(|rest| rest.starts_with(' ') || rest.starts_with('{'))
                .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            sum = Some(sum.unwrap_or(0.0) + value);
        }
        sum
    }

    /// `http://127.0.0.1:PORT` of every ingest.
    pub fn ingest_urls(&self) -> Vec<String> {
        self.of_role(Role::Ingest)
            .into_iter()
            .map(|i| format!("http://127.0.0.1:{}", self.procs[i].port))
            .collect()
    }

    /// SIGTERM to everything, then SIGKILL whatever has not drained within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        for i in 0..self.procs.len() {
            let _ = self.signal(i, "TERM");
        }
        let deadline = tokio::time::Instant::now() + grace;
        for p in &mut self.procs {
            if let Some(mut child) = p.child.take()
                && tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}
