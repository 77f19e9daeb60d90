//! The fault loop: while the load runs, at random moments, one fault at a time.
//!
//! Faults: `kill -9` of a random process (restarted after a pause), closing every broker
//! connection of the suite's vhost, terminating every backend of the suite's database,
//! bursts of Graph rate-limit answers and of hung calls (longer than the client timeout),
//! and once per run a page token turned invalid at Graph and then replaced — in the pages file
//! (with `SIGHUP` to the schedulers in the classic mode; in the scale-out mode they must notice
//! the new content by themselves) or with `loginconnect pages set-token`. On the suite's
//! private services, also a broker stop/start and a database server crash and restart, once
//! each. With the database behind the latency proxy, once per run the delay is switched off
//! for a while and on again (`db-slow`). The transient Graph errors are on for the whole load
//! and are not part of this loop.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lc_testkit::fake_graph::{FakeGraph, FakeResponse};
use time::OffsetDateTime;

use crate::dbproxy::LatencyProxy;
use crate::procs::{Fleet, Role};
use crate::setup::Services;

/// The kinds of fault the loop may pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL of a process, then a restart.
    Kill,
    /// Every broker connection of the vhost closed.
    BrokerClose,
    /// Every database backend of the suite's database terminated.
    DbTerminate,
    /// A burst of Graph rate-limit answers.
    RateLimit,
    /// A burst of Graph calls that hang past the client timeout.
    Hang,
    /// A page token turned invalid at Graph, replaced later (see [`TokenFix`]).
    Token,
    /// `rabbitmqctl stop_app` / `start_app` (private services only).
    BrokerRestart,
    /// PostgreSQL server crash-stop and start (private services only).
    DbRestart,
    /// The database proxy's delay switched off for a while, then on again (only with the
    /// proxy).
    DbSlow,
}

impl Fault {
    /// Name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "kill",
            Self::BrokerClose => "broker-close",
            Self::DbTerminate => "db-terminate",
            Self::RateLimit => "rate-limit",
            Self::Hang => "hang",
            Self::Token => "token",
            Self::BrokerRestart => "broker-restart",
            Self::DbRestart => "db-restart",
            Self::DbSlow => "db-slow",
        }
    }

    /// Parses [`Fault::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Kill,
            Self::BrokerClose,
            Self::DbTerminate,
            Self::RateLimit,
            Self::Hang,
            Self::Token,
            Self::BrokerRestart,
            Self::DbRestart,
            Self::DbSlow,
        ]
        .into_iter()
        .find(|f| f.name() == s)
    }
}

/// The pages file the schedulers read, and its generation (bumped at every rewrite).
pub struct PagesFile {
    /// Its path.
    pub path: PathBuf,
    /// Token per page, as written.
    pub tokens: BTreeMap<String, String>,
    /// Incremented at every rewrite.
    pub generation: u64,
}

impl PagesFile {
    /// Writes the file for the current tokens.
    pub fn write(&mut self) -> anyhow::Result<()> {
        let mut text = String::new();
        for (id, token) in &self.tokens {
            text.push_str(&format!(
                "[[pages]]\nid = \"{id}\"\naccess_token = \"{token}\"\n[pages.first_message]\n\
                 text = \"Thanks for signing up! What can we help you with?\"\n\
                 quick_replies = [ {{ title = \"Track my order\", payload = \"TRACK\" }} ]\n\n"
            ));
        }
        // Written to a temporary file and renamed, so a scheduler never reads half a file.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)?;
        self.generation += 1;
        Ok(())
    }
}

/// How the token fault puts the page's new token in place.
#[derive(Debug, Clone)]
pub enum TokenFix {
    /// The pages file is rewritten. With `sighup` the schedulers also get `SIGHUP` (the
    /// classic mode); without, they must notice the new content themselves (they poll the file
    /// by content every second).
    File {
        /// Signal the schedulers after the rewrite.
        sighup: bool,
    },
    /// `loginconnect pages set-token PAGE --from-file FILE`: the token is stored (encrypted)
    /// in the database and every scheduler takes it from there.
    SetToken(SetTokenCli),
}

impl TokenFix {
    /// Short name for the report.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::File { sighup: true } => "pages file + SIGHUP",
            Self::File { sighup: false } => "pages file (noticed by content)",
            Self::SetToken(_) => "loginconnect pages set-token --from-file",
        }
    }
}

/// How to run `loginconnect pages set-token`.
#[derive(Debug, Clone)]
pub struct SetTokenCli {
    /// The `loginconnect` binary.
    pub program: PathBuf,
    /// Its environment (`DATABASE_URL`, `AMQP_URL`, `PAGE_TOKEN_KEYS`).
    pub env: Vec<(String, String)>,
    /// Where the new token is written for `--from-file`.
    pub token_file: PathBuf,
}

/// The token fault as it happened, for the books.
#[derive(Debug, Clone)]
pub struct TokenChange {
    /// The page.
    pub page: String,
    /// The token Graph stopped accepting.
    pub old_token: String,
    /// The token that replaced it.
    pub new_token: String,
    /// When Graph stopped accepting the old token.
    pub broken_at: OffsetDateTime,
    /// When the new token was in place (file renamed, or `set-token` returned).
    pub fixed_at: Option<OffsetDateTime>,
    /// How it was replaced.
    pub how: &'static str,
}

/// Settings of the loop.
pub struct ChaosConfig {
    /// Faults the loop may pick (the flag-only ones are done once each if present).
    pub enabled: Vec<Fault>,
    /// Pause between two faults: uniformly in this range.
    pub gap: (Duration, Duration),
    /// How long a hung Graph call hangs (longer than the client timeout).
    pub hang: Duration,
    /// How long the load runs (the once-per-run faults are placed in it).
    pub load: Duration,
    /// The page whose token the token fault breaks.
    pub token_page: String,
    /// How the token fault replaces it.
    pub token_fix: TokenFix,
    /// The database proxy's delay when it is on (`db-slow` switches it off for a while).
    pub db_latency: Duration,
    /// How long `db-slow` keeps the delay off.
    pub db_fast_for: Duration,
}

/// The second half of a fault, due later.
pub enum Later {
    /// Put the page's new token in place.
    FixToken(String),
    /// Switch the database proxy's delay on again.
    SlowDbAgain,
}

/// Runs `loginconnect pages set-token PAGE --from-file FILE` (a few tries: a database fault
/// may be going on).
async fn set_token(cli: &SetTokenCli, page: &str, token: &str) -> anyhow::Result<()> {
    std::fs::write(&cli.token_file, format!("{token}\n"))
        .with_context(|| format!("cannot write {}", cli.token_file.display()))?;
    let mut last = String::new();
    for _ in 0..5 {
        let out = tokio::process::Command::new(&cli.program)
            .args(["pages", "set-token", page, "--from-file"])
            .arg(&cli.token_file)
            .envs(cli.env.iter().cloned())
            .output()
            .await
            .with_context(|| format!("cannot run {}", cli.program.display()))?;
        if out.status.success() {
            return Ok(());
        }
        last = format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    anyhow::bail!("loginconnect pages set-token failed 5 times; last: {last}")
}

/// The token a page gets when the token fault "fixes" it.
fn new_token(page: &str) -> String {
    format!("faults-token-{page}-v2")
}

/// What happened, when (seconds since the run started).
pub struct Timeline {
    start: Instant,
    /// The entries.
    pub entries: Vec<(f64, String)>,
    /// How many of each fault were injected.
    pub counts: BTreeMap<&'static str, u32>,
    /// The token fault, if it was injected.
    pub token_change: Option<TokenChange>,
}

impl Timeline {
    /// An empty timeline starting now.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            entries: Vec::new(),
            counts: BTreeMap::new(),
            token_change: None,
        }
    }

    /// Seconds since the start.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Records and prints one entry.
    pub fn note(&mut self, text: String) {
        let at = self.now();
        println!("  [{at:7.1}s] {text}");
        self.entries.push((at, text));
    }

    fn count(&mut self, fault: Fault) {
        *self.counts.entry(fault.name()).or_default() += 1;
    }
}

/// Everything the loop acts on.
pub struct Chaos<'a> {
    /// The processes.
    pub fleet: &'a mut Fleet,
    /// The suite's vhost and database.
    pub services: &'a Services,
    /// The fake Graph.
    pub graph: &'a FakeGraph,
    /// The pages file.
    pub pages: &'a mut PagesFile,
    /// The database latency proxy, if the processes go through one.
    pub proxy: Option<&'a LatencyProxy>,
    /// The record.
    pub timeline: &'a mut Timeline,
    /// Random choices (seeded).
    pub rng: fastrand::Rng,
}

impl Chaos<'_> {
    /// Injects faults until `stop` resolves; then makes sure every process runs and every
    /// scheduler has the current pages file.
    pub async fn run(
        &mut self,
        config: &ChaosConfig,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(stop);
        let repeatable: Vec<Fault> = config
            .enabled
            .iter()
            .copied()
            .filter(|f| {
                matches!(
                    f,
                    Fault::Kill
                        | Fault::BrokerClose
                        | Fault::DbTerminate
                        | Fault::RateLimit
                        | Fault::Hang
                )
            })
            .collect();
        // The once-per-run faults go at fixed points of the load (30 %, 50 %, 70 % …), so
        // they never overlap and each meets a system under load.
        let once_faults: Vec<Fault> = config
            .enabled
            .iter()
            .copied()
            .filter(|f| {
                matches!(
                    f,
                    Fault::Token | Fault::BrokerRestart | Fault::DbRestart | Fault::DbSlow
                )
            })
            .collect();
        let started = Instant::now();
        let mut once: Vec<(Instant, Fault)> = once_faults
            .iter()
            .enumerate()
            .map(|(k, f)| (started + config.load.mul_f64(0.3 + 0.2 * k as f64), *f))
            .collect();
        let mut later: Vec<(Instant, Later)> = Vec::new();
        let mut next_fault = Instant::now() + self.gap(config);
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            self.fleet.reap_unexpected(self.pages.generation)?;
            self.refresh_schedulers(config).await;
            if let Some(k) = later.iter().position(|(due, _)| Instant::now() >= *due) {
                let (_, what) = later.remove(k);
                self.finish(what, config).await?;
                self.refresh_schedulers(config).await;
            }
            if let Some(k) = once.iter().position(|(at, _)| Instant::now() >= *at) {
                let (_, fault) = once.remove(k);
                if let Err(e) = self.inject(fault, config, &mut later).await {
                    self.timeline.note(format!(
                        "fault {} could not be injected: {e:#}",
                        fault.name()
                    ));
                }
                next_fault = Instant::now() + self.gap(config);
                continue;
            }
            if Instant::now() < next_fault || repeatable.is_empty() {
                continue;
            }
            let fault = repeatable[self.rng.usize(..repeatable.len())];
            if let Err(e) = self.inject(fault, config, &mut later).await {
                self.timeline.note(format!(
                    "fault {} could not be injected: {e:#}",
                    fault.name()
                ));
            }
            next_fault = Instant::now() + self.gap(config);
        }
        for (_, what) in later {
            self.finish(what, config).await?;
        }
        self.fleet.reap_unexpected(self.pages.generation)?;
        for i in 0..self.fleet.procs.len() {
            if self.fleet.procs[i].pid().is_none() {
                self.fleet.spawn(i, self.pages.generation)?;
            }
            self.fleet.wait_ready(i, Duration::from_secs(120)).await?;
        }
        self.refresh_schedulers(config).await;
        Ok(())
    }

    /// The second half of a fault that heals later.
    async fn finish(&mut self, what: Later, config: &ChaosConfig) -> anyhow::Result<()> {
        match what {
            Later::FixToken(page) => self.fix_token(&page, &config.token_fix).await,
            Later::SlowDbAgain => {
                if let Some(proxy) = self.proxy {
                    proxy.set_delay(config.db_latency);
                    self.timeline.note(format!(
                        "database proxy: delay back on ({:?} per chunk)",
                        config.db_latency
                    ));
                }
                Ok(())
            }
        }
    }

    /// Puts the page's new (valid) token in place, the way `how` says.
    async fn fix_token(&mut self, page: &str, how: &TokenFix) -> anyhow::Result<()> {
        let token = new_token(page);
        match how {
            TokenFix::File { sighup } => {
                self.pages.tokens.insert(page.to_owned(), token);
                self.pages.write()?;
                self.timeline.note(format!(
                    "pages file: token of page {page} replaced{}",
                    if *sighup {
                        "; SIGHUP to the schedulers"
                    } else {
                        " (no signal: the schedulers poll the file by content)"
                    }
                ));
            }
            TokenFix::SetToken(cli) => {
                set_token(cli, page, &token).await?;
                self.timeline.note(format!(
                    "loginconnect pages set-token {page} --from-file {}: stored",
                    cli.token_file.display()
                ));
            }
        }
        if let Some(change) = self.timeline.token_change.as_mut() {
            change.fixed_at = Some(OffsetDateTime::now_utc());
        }
        Ok(())
    }

    fn gap(&mut self, config: &ChaosConfig) -> Duration {
        let (lo, hi) = config.gap;
        lo + (hi.saturating_sub(lo)).mul_f64(self.rng.f64())
    }

    /// SIGHUP to every scheduler that runs with an older pages file than the current one,
    /// once it is up (a process that has not installed its handler yet would die of it; a
    /// process started after the rewrite read the new file anyway). Only when the token is
    /// fixed through the file with `sighup`.
    async fn refresh_schedulers(&mut self, config: &ChaosConfig) {
        if !matches!(config.token_fix, TokenFix::File { sighup: true }) {
            return;
        }
        for i in self.fleet.of_role(Role::Scheduler) {
            let p = &self.fleet.procs[i];
            if p.pages_generation >= self.pages.generation
                || p.started.elapsed() < Duration::from_secs(2)
            {
                continue;
            }
            if !self.fleet.is_ready(i).await {
                continue;
            }
            if self.fleet.signal(i, "HUP").is_ok() {
                self.fleet.procs[i].pages_generation = self.pages.generation;
            }
        }
    }

    async fn inject(
        &mut self,
        fault: Fault,
        config: &ChaosConfig,
        later: &mut Vec<(Instant, Later)>,
    ) -> anyhow::Result<()> {
        self.timeline.count(fault);
        match fault {
            Fault::Kill => {
                let i = self.rng.usize(..self.fleet.procs.len());
                let name = self.fleet.procs[i].name();
                let pid = self.fleet.procs[i].pid().unwrap_or(0);
                self.fleet.kill9(i).await;
                self.timeline.note(format!("kill -9 {name} (pid {pid})"));
                tokio::time::sleep(Duration::from_millis(self.rng.u64(200..2000))).await;
                self.fleet.spawn(i, self.pages.generation)?;
                self.timeline.note(format!(
                    "restarted {name} (pid {})",
                    self.fleet.procs[i].pid().unwrap_or(0)
                ));
            }
            Fault::BrokerClose => {
                let n = self.services.close_vhost_connections()?;
                self.timeline.note(format!(
                    "broker: closed {n} connections of vhost {}",
                    self.services.vhost
                ));
            }
            Fault::DbTerminate => {
                let n = self.services.terminate_backends().await?;
                self.timeline.note(format!(
                    "database: terminated {n} backends of {}",
                    self.services.database
                ));
            }
            Fault::RateLimit => {
                let n = self.rng.usize(10..40);
                let code = [613, 80006, 4][self.rng.usize(..3)];
                self.graph.push_global(vec![
                    FakeResponse::RateLimited {
                        code,
                        regain_minutes: 0
                    };
                    n
                ]);
                self.timeline.note(format!(
                    "graph: next {n} sends answer rate limit (code {code}, regain 0 min)"
                ));
            }
            Fault::Hang => {
                let n = self.rng.usize(1..4);
                self.graph
                    .push_global(vec![FakeResponse::Hang(config.hang); n]);
                self.timeline.note(format!(
                    "graph: next {n} sends hang {:?} (past the client timeout)",
                    config.hang
                ));
            }
            Fault::Token => {
                let page = config.token_page.clone();
                let old_token = self
                    .pages
                    .tokens
                    .get(&page)
                    .cloned()
                    .context("the token fault's page is not in the pages file")?;
                self.graph.set_token(&page, &new_token(&page));
                self.timeline.token_change = Some(TokenChange {
                    page: page.clone(),
                    old_token,
                    new_token: new_token(&page),
                    broken_at: OffsetDateTime::now_utc(),
                    fixed_at: None,
                    how: config.token_fix.describe(),
                });
                let fix_in = Duration::from_secs(self.rng.u64(3..8));
                later.push((Instant::now() + fix_in, Later::FixToken(page.clone())));
                self.timeline.note(format!(
                    "graph: token of page {page} now invalid (replaced in {fix_in:?} by {})",
                    config.token_fix.describe()
                ));
            }
            Fault::DbSlow => {
                let proxy = self
                    .proxy
                    .context("db-slow needs the database proxy (--db-latency-ms)")?;
                let was = proxy.delay();
                proxy.set_delay(Duration::ZERO);
                later.push((Instant::now() + config.db_fast_for, Later::SlowDbAgain));
                self.timeline.note(format!(
                    "database proxy: delay off for {:?} (was {was:?} per chunk)",
                    config.db_fast_for
                ));
            }
            Fault::BrokerRestart => {
                self.timeline.note("broker: rabbitmqctl stop_app".into());
                self.services.restart_broker(Duration::from_secs(5)).await?;
                self.timeline.note("broker: rabbitmqctl start_app".into());
            }
            Fault::DbRestart => {
                self.timeline
                    .note("database: server crash-stopped (pg_ctl stop -m immediate)".into());
                self.services
                    .restart_database(Duration::from_secs(3))
                    .await?;
                self.timeline.note("database: server started".into());
            }
        }
        Ok(())
    }
}
