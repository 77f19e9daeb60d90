//! Resident memory and CPU time of any process, read from `/proc/<pid>/status` and
//! `/proc/<pid>/stat` (Linux). Process mode and the soak read the service processes they
//! started; [`crate::machine`] reads the bench process itself; the ingest suite reads the
//! bench process and the RabbitMQ node over its bare publishers' windows ([`cpu_over_window`]).

use std::sync::OnceLock;

/// One reading of a process.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ProcStats {
    /// Current resident set (`VmRSS`), kB.
    pub rss_kb: u64,
    /// Peak resident set since the process started (`VmHWM`), kB.
    pub hwm_kb: u64,
    /// User plus system CPU time so far (`utime + stime`), seconds.
    pub cpu_s: f64,
}

/// What went wrong reading a process's figures.
#[derive(Debug, thiserror::Error)]
pub enum ProcStatsError {
    /// The `/proc` file could not be read: the process has exited, or this is not Linux.
    #[error("cannot read {path}: {source} (has the process exited?)")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file did not have the expected shape.
    #[error("{path} has no readable {field}")]
    Field {
        /// The file.
        path: String,
        /// The field that was missing or not a number.
        field: &'static str,
    },
}

/// Reads `pid`'s resident memory and CPU time now.
pub fn read(pid: u32) -> Result<ProcStats, ProcStatsError> {
    let status_path = format!("/proc/{pid}/status");
    let status = read_file(&status_path)?;
    let stat_path = format!("/proc/{pid}/stat");
    let stat = read_file(&stat_path)?;
    let field = |path: &str, field: &'static str| ProcStatsError::Field {
        path: path.to_owned(),
        field,
    };
    Ok(ProcStats {
        rss_kb: status_kb(&status, "VmRSS:").ok_or_else(|| field(&status_path, "VmRSS"))?,
        hwm_kb: status_kb(&status, "VmHWM:").ok_or_else(|| field(&status_path, "VmHWM"))?,
        cpu_s: cpu_ticks(&stat).ok_or_else(|| field(&stat_path, "utime/stime"))? as f64
            / clock_ticks_per_s(),
    })
}

fn read_file(path: &str) -> Result<String, ProcStatsError> {
    std::fs::read_to_string(path).map_err(|source| ProcStatsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The kB value of `key` in a `/proc/<pid>/status` text.
pub fn status_kb(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// `utime + stime` in clock ticks from a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may itself contain spaces and parentheses, so fields are counted
/// from the last `)`: `utime` and `stime` are fields 14 and 15 of the whole line, the 12th
/// and 13th after the name.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// `sysconf(_SC_CLK_TCK)` through `getconf CLK_TCK` (no libc calls: the crate forbids
/// `unsafe`); 100, the value on every common Linux build, if that fails.
fn clock_ticks_per_s() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The local RabbitMQ node's process (`beam.smp`), when exactly one runs on the machine: with
/// several (e.g. a fault suite's own nodes) the one serving the bench cannot be told apart
/// here, and no figure beats a wrong one.
pub fn broker_pid() -> Option<u32> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

/// CPU seconds used so far by every PostgreSQL process on the machine (command name
/// `postgres`: the postmaster, its background workers and every backend). A backend that
/// exits between two readings takes its seconds with it, so read it around a window in
/// which the connections stay open (a pool's).
pub fn postgres_cpu_s() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .filter_map(|pid| read(pid).ok())
        .map(|s| s.cpu_s)
        .sum()
}

/// A starting point for [`CpuMark::since`]: the wall clock, this process's and
/// PostgreSQL's CPU seconds.
#[derive(Debug, Clone, Copy)]
pub struct CpuMark {
    at: std::time::Instant,
    me_s: f64,
    postgres_s: f64,
}

/// CPU used over a window, in cores (CPU seconds per wall second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// Length of the window, seconds.
    pub wall_s: f64,
    /// This process (services started in-process, load generator, fake Graph).
    pub me_cores: f64,
    /// Every PostgreSQL process.
    pub postgres_cores: f64,
}

impl CpuMark {
    /// Reads the clock and both CPU counters now.
    pub fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            me_s: read(std::process::id()).map_or(0.0, |s| s.cpu_s),
            postgres_s: postgres_cpu_s(),
        }
    }

    /// The cores used since this mark.
    pub fn since(&self) -> CpuUse {
        let wall = self.at.elapsed().as_secs_f64().max(1e-9);
        let later = Self::now();
        CpuUse {
            wall_s: wall,
            me_cores: (later.me_s - self.me_s) / wall,
            postgres_cores: (later.postgres_s - self.postgres_s) / wall,
        }
    }
}

/// CPU seconds used by this process and by `other` (if given) over a window that opens after
/// `warmup` and lasts `measure` — the measurement window of a closed loop started now, so the
/// CPU time can be divided by the events counted in that window.
pub fn cpu_over_window(
    warmup: std::time::Duration,
    measure: std::time::Duration,
    other: Option<u32>,
) -> tokio::task::JoinHandle<Option<(f64, Option<f64>)>> {
    tokio::spawn(async move {
        let me = std::process::id();
        tokio::time::sleep(warmup).await;
        let (a, oa) = (read(me).ok()?, other.and_then(|p| read(p).ok()));
        tokio::time::sleep(measure).await;
        let (b, ob) = (read(me).ok()?, other.and_then(|p| read(p).ok()));
        let other_s = oa.zip(ob).map(|(x, y)| y.cpu_s - x.cpu_s);
        Some((b.cpu_s - a.cpu_s, other_s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_name_containing_spaces_and_parens() {
        // Fields 14 and 15 (utime, stime) are 700 and 35.
        let line = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 700 35 0 0 20 0 3 0";
        assert_eq!(cpu_ticks(line), Some(735));
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn reads_this_process() {
        assert_eq!(
            status_kb("VmHWM:\t  1234 kB\nVmRSS: 10 kB", "VmRSS:"),
            Some(10)
        );
        let me = read(std::process::id()).expect("own /proc entry");
        assert!(me.rss_kb > 0 && me.hwm_kb >= me.rss_kb, "{me:?}");
        assert!(me.cpu_s >= 0.0);
        assert!(matches!(read(u32::MAX), Err(ProcStatsError::Read { .. })));
    }
}
