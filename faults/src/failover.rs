//! The `--db-failover` mode (issue 15): the suite's PostgreSQL is a primary with a streaming
//! standby (`pg_basebackup`), synchronous replication; once, mid-load, the primary's
//! postmaster is killed with `kill -9` (no shutdown: what a lost machine looks like to
//! clients and to the standby), and after a detection delay the standby is promoted with
//! `pg_ctl promote`. Every process — ingest, schedulers, correlators, the CLI the suite runs,
//! and the suite's own queries — has the same multi-host `DATABASE_URL` (standby first,
//! `target_session_attrs=read-write`), so nothing is reconfigured: the workers must find the
//! new primary by themselves, and the classic books must still balance.
//!
//! The failover runs beside the fault loop (its own task, its own timeline notes, merged into
//! the run's timeline afterwards), so the loop itself is unchanged — and so the loop's
//! blocking operator commands (`rabbitmqctl` can take seconds) never delay the promotion.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use lc_testkit::private::PrivateCluster;
use time::OffsetDateTime;

use crate::books::Check;
use crate::dbproxy::LatencyProxy;

/// The standby's `application_name`, which the primary names in `synchronous_standby_names`.
const STANDBY_NAME: &str = "lc_faults_standby";

/// How long the failover leaves the database without a primary between the kill and the
/// promotion: the time a failover manager needs to notice a dead primary is not the
/// application's to measure, so it is a fixed, stated part of the stall.
pub const DETECT: Duration = Duration::from_secs(3);

/// Where in the load the failover happens (after the once-per-run faults of the loop, at 30 %
/// and 50 %, so they do not overlap).
pub const AT_SHARE: f64 = 0.7;

/// `postgres://postgres@127.0.0.1:<p1>,127.0.0.1:<p2>/<db>?target_session_attrs=read-write`:
/// libpq's multi-host form, which `lc_shared::db` and tokio-postgres both take. A
/// `connect_timeout` keeps a host that does not answer from holding a connection attempt.
pub fn multi_host_url(ports: &[u16], db: &str) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "postgres://postgres@{}/{db}?target_session_attrs=read-write&connect_timeout=5",
        hosts.join(",")
    )
}

/// How the standby replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Synchronous: a commit returns once the standby has it on disk (the mode's default).
    Sync,
    /// Asynchronous, with the WAL stream through a latency proxy that holds every chunk this
    /// long: the standby is that far behind when the primary dies (a demonstration of what
    /// asynchronous replication loses; the books are expected to fail).
    AsyncLagging(Duration),
}

impl Replication {
    /// The `sync_state` the primary should report for the standby.
    fn expected_state(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::AsyncLagging(_) => "async",
        }
    }
}

/// Starts a streaming standby of `primary` under `dir`. Synchronous: set on the primary only
/// after the copy, so the standby (a copy of the primary's settings) does not wait for a
/// standby of its own once promoted. Asynchronous: the copy and the stream go through a
/// [`LatencyProxy`] (returned: it must live as long as the standby streams). Returns once the
/// primary reports the standby's expected `sync_state`.
pub async fn start_standby(
    primary: &PrivateCluster,
    dir: &Path,
    replication: Replication,
) -> anyhow::Result<(PrivateCluster, Option<LatencyProxy>)> {
    let (standby, proxy) = match replication {
        Replication::Sync => {
            let standby = primary.start_standby(&dir.join("standby"), STANDBY_NAME)?;
            primary
                .set("synchronous_standby_names", STANDBY_NAME)
                .await
                .context("cannot make the standby synchronous")?;
            (standby, None)
        }
        Replication::AsyncLagging(lag) => {
            let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], primary.port));
            let proxy = LatencyProxy::start(upstream, lag).await?;
            let standby =
                primary.start_standby_via(&dir.join("standby"), STANDBY_NAME, proxy.port())?;
            (standby, Some(proxy))
        }
    };
    let url = format!("{}/postgres", primary.postgres_base());
    let expected = replication.expected_state();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if sync_state(&url).await.as_deref() == Some(expected) {
            return Ok((standby, proxy));
        }
        if Instant::now() >= deadline {
            // Stopped here: the caller never got to own it.
            standby.stop(false);
            bail!("the standby did not become {expected} within 30 s");
        }
        // The primary's view of the standby changes when its walreceiver reports; no event.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The primary's `sync_state` of the suite's standby (`sync`, `async`, …), if it streams.
async fn sync_state(url: &str) -> Option<String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    let task = tokio::spawn(conn);
    let state = client
        .query_opt(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
            &[&STANDBY_NAME],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0));
    drop(client);
    task.abort();
    state
}

/// What the failover did and when.
#[derive(Debug, Default)]
pub struct Record {
    /// The primary's postmaster pid that got `kill -9`.
    pub killed_pid: Option<u32>,
    /// When it was killed.
    pub killed_at: Option<OffsetDateTime>,
    /// The standby's `sync_state` on the primary just before the kill (`sync` expected).
    pub standby_state: Option<String>,
    /// When `pg_ctl promote` was started.
    pub promoting_at: Option<OffsetDateTime>,
    /// When `pg_ctl promote` returned (the standby accepts writes).
    pub promoted_at: Option<OffsetDateTime>,
    /// When a write (`SELECT txid_current()`) first went through the multi-host URL again.
    pub first_write_at: Option<OffsetDateTime>,
    /// What went wrong, if the failover could not be carried out.
    pub error: Option<String>,
    /// Timeline entries (seconds since the run started, text), printed as they happen.
    pub notes: Vec<(f64, String)>,
}

impl Record {
    fn note(&mut self, start: Instant, text: String) {
        let at = start.elapsed().as_secs_f64();
        println!("  [{at:7.1}s] {text}");
        self.notes.push((at, text));
    }
}

/// Waits until `at` after `start`, then kills the primary, waits [`DETECT`], promotes the
/// standby and probes the multi-host URL until a write goes through (at most 60 s).
pub async fn fail_over(
    primary: PrivateCluster,
    standby: PrivateCluster,
    replication: Replication,
    start: Instant,
    at: Duration,
) -> Record {
    let mut record = Record::default();
    tokio::time::sleep_until((start + at).into()).await;
    if let Err(e) = carry_out(primary, standby, replication, start, &mut record).await {
        record.note(
            start,
            format!("database failover could not be carried out: {e:#}"),
        );
        record.error = Some(format!("{e:#}"));
    }
    record
}

async fn carry_out(
    primary: PrivateCluster,
    standby: PrivateCluster,
    replication: Replication,
    start: Instant,
    record: &mut Record,
) -> anyhow::Result<()> {
    let state = sync_state(&format!("{}/postgres", primary.postgres_base())).await;
    record.standby_state = state.clone();
    if let Replication::AsyncLagging(lag) = replication {
        // The machine is lost with its network: the WAL the proxy still holds (the lag) must
        // not reach the standby after the crash, as it would through a live proxy. An empty
        // primary_conninfo stops the walreceiver at once; its connection, and what the proxy
        // held for it, go.
        standby.set("primary_conninfo", "").await?;
        record.note(
            start,
            format!("database: standby cut off from the primary ({lag:?} of WAL held back by the proxy is lost)"),
        );
    }
    record.killed_at = Some(OffsetDateTime::now_utc());
    let killed = tokio::time::Instant::now();
    let pid = primary.kill9().await?;
    record.killed_pid = Some(pid);
    record.note(
        start,
        format!(
            "database: kill -9 of the primary's postmaster (pid {pid}, port {}; standby was {})",
            primary.port,
            state.as_deref().unwrap_or("not streaming")
        ),
    );
    tokio::time::sleep_until(killed + DETECT).await;
    record.promoting_at = Some(OffsetDateTime::now_utc());
    let promoting = standby.clone();
    // pg_ctl -w waits for the promotion: off the runtime's threads.
    tokio::task::spawn_blocking(move || promoting.promote())
        .await
        .context("the promotion task failed")??;
    let promoted = OffsetDateTime::now_utc();
    record.promoted_at = Some(promoted);
    record.note(
        start,
        format!(
            "database: standby (port {}) promoted (pg_ctl promote started {DETECT:?} after the kill, took {:.2}s)",
            standby.port,
            record
                .promoting_at
                .map_or(0.0, |p| (promoted - p).as_seconds_f64())
        ),
    );
    let url = multi_host_url(&[standby.port, primary.port], "postgres");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if write_probe(&url).await {
            let now = OffsetDateTime::now_utc();
            record.first_write_at = Some(now);
            let after = record.killed_at.map_or(0.0, |k| (now - k).as_seconds_f64());
            record.note(
                start,
                format!(
                    "database: a write went through the multi-host URL {after:.2}s after the kill"
                ),
            );
            return Ok(());
        }
        // Polled: nothing announces that a server has become writable.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no write went through the multi-host URL within 60 s of the promotion")
}

/// Whether a transaction id can be assigned (only on a primary) through `url`.
async fn write_probe(url: &str) -> bool {
    let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await else {
        return false;
    };
    let task = tokio::spawn(conn);
    let ok = client.simple_query("SELECT txid_current()").await.is_ok();
    drop(client);
    task.abort();
    ok
}

/// What the system itself wrote around the failover, read from the final database.
#[derive(Debug, Default, Clone, Copy)]
pub struct Writes {
    /// The last outbox row (a committed state change) before the kill.
    pub last_before: Option<OffsetDateTime>,
    /// The first outbox row after the kill (necessarily on the promoted standby).
    pub first_after: Option<OffsetDateTime>,
    /// Outbox rows written after the promotion.
    pub after_promotion: i64,
}

impl Writes {
    /// Reads them from the database the failover left.
    pub async fn load(sql: &tokio_postgres::Client, record: &Record) -> anyhow::Result<Self> {
        let (Some(killed), Some(promoted)) = (record.killed_at, record.promoted_at) else {
            return Ok(Self::default());
        };
        let row = sql
            .query_one(
                "SELECT (SELECT max(created_at) FROM outbox WHERE created_at < $1), \
                        (SELECT min(created_at) FROM outbox WHERE created_at >= $1), \
                        (SELECT count(*) FROM outbox WHERE created_at >= $2)",
                &[&killed, &promoted],
            )
            .await?;
        Ok(Self {
            last_before: row.get(0),
            first_after: row.get(1),
            after_promotion: row.get(2),
        })
    }
}

/// The failover's own check: the primary was killed and the standby promoted, a write went
/// through the multi-host URL, and the workers committed on the new primary (the classic
/// books then say whether anything committed was lost). Also the figures for the report.
pub fn check(record: &Record, writes: &Writes, replication: Replication) -> Check {
    let mut problems = Vec::new();
    if let Some(e) = &record.error {
        problems.push(format!("the failover failed: {e}"));
    }
    let secs = |t: Option<OffsetDateTime>| {
        t.zip(record.killed_at)
            .map(|(t, k)| (t - k).as_seconds_f64())
    };
    let expected = replication.expected_state();
    if record.killed_at.is_some() && record.standby_state.as_deref() != Some(expected) {
        problems.push(format!(
            "the standby was not {expected} when the primary was killed ({}): the run does not show what it should",
            record.standby_state.as_deref().unwrap_or("not streaming")
        ));
    }
    if record.killed_at.is_some() && writes.after_promotion == 0 {
        problems.push(
            "no process committed anything on the promoted standby (no outbox row after the promotion): the workers did not find the new primary"
                .into(),
        );
    }
    let fmt = |s: Option<f64>| s.map_or("–".into(), |s| format!("{s:.2}s"));
    let detail = match record.killed_pid {
        None => "the primary was never killed".into(),
        Some(pid) => format!(
            "primary (postmaster pid {pid}) killed -9, standby promoted {} after; a write through the multi-host URL {} after the kill; the system's writes stalled {} (from the kill to its first commit after it; its last commit before it: {} before); {} events committed on the new primary",
            fmt(secs(record.promoted_at)),
            fmt(secs(record.first_write_at)),
            fmt(secs(writes.first_after)),
            fmt(writes
                .last_before
                .zip(record.killed_at)
                .map(|(b, k)| (k - b).as_seconds_f64())),
            writes.after_promotion
        ),
    };
    Check {
        name: "database failover: the standby promoted, the workers found it through the multi-host URL",
        problems,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_names_every_host_and_asks_for_a_writable_one() {
        assert_eq!(
            multi_host_url(&[5433, 5432], "db"),
            "postgres://postgres@127.0.0.1:5433,127.0.0.1:5432/db?target_session_attrs=read-write&connect_timeout=5"
        );
    }

    fn failed_over() -> Record {
        let t = OffsetDateTime::now_utc();
        Record {
            killed_pid: Some(42),
            killed_at: Some(t),
            standby_state: Some("sync".into()),
            promoted_at: Some(t + time::Duration::seconds(3)),
            first_write_at: Some(t + time::Duration::seconds(4)),
            ..Record::default()
        }
    }

    #[test]
    fn workers_that_never_wrote_on_the_new_primary_fail_the_check() {
        let record = failed_over();
        let stuck = Writes {
            last_before: record
                .killed_at
                .map(|k| k - time::Duration::milliseconds(500)),
            first_after: None,
            after_promotion: 0,
        };
        assert_eq!(check(&record, &stuck, Replication::Sync).problems.len(), 1);
        let moved_on = Writes {
            first_after: record.first_write_at,
            after_promotion: 17,
            ..stuck
        };
        let ok = check(&record, &moved_on, Replication::Sync);
        assert!(ok.problems.is_empty(), "{:?}", ok.problems);
        assert!(ok.detail.contains("writes stalled 4.00s"), "{}", ok.detail);
        assert!(
            ok.detail.contains("last commit before it: 0.50s"),
            "{}",
            ok.detail
        );
        let asynchronous = Record {
            standby_state: Some("async".into()),
            ..failed_over()
        };
        assert_eq!(
            check(&asynchronous, &moved_on, Replication::Sync)
                .problems
                .len(),
            1
        );
        // The asynchronous demonstration expects an asynchronous standby.
        let lagging = Replication::AsyncLagging(Duration::from_secs(1));
        assert!(check(&asynchronous, &moved_on, lagging).problems.is_empty());
        assert_eq!(check(&record, &moved_on, lagging).problems.len(), 1);
    }

    #[test]
    fn a_failover_that_did_not_happen_fails_the_check() {
        let record = Record {
            error: Some("could not kill".into()),
            ..Record::default()
        };
        assert!(
            !check(&record, &Writes::default(), Replication::Sync)
                .problems
                .is_empty()
        );
    }
}
