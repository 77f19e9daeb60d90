//! The machine a run measures: cores, memory, load, service versions, and this process's
//! resident memory (`/proc/self/status`).

use serde_json::{Value, json};

/// What every report records about the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// Logical cores available to this process.
    pub cores: usize,
    /// CPU model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Total RAM in MB.
    pub ram_mb: u64,
    /// Kernel release.
    pub kernel: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the suite started.
    pub load_start: String,
    /// `/proc/loadavg` when the suite ended.
    pub load_end: String,
    /// `rabbitmqctl version`.
    pub rabbitmq_version: String,
    /// `SELECT version()` of the PostgreSQL server.
    pub postgres_version: String,
    /// The server's `autovacuum` setting: `off` on some CI images, where dead rows of a
    /// long run are never vacuumed (production servers run it).
    pub postgres_autovacuum: String,
}

impl Machine {
    /// Probes the machine now (the services' versions are asked for; failures are recorded
    /// as `unknown: …`, never fatal).
    pub async fn probe() -> Self {
        Self {
            cores: cores(),
            cpu_model: cpu_model(),
            ram_mb: meminfo_kb("MemTotal:").unwrap_or(0) / 1024,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            load_start: loadavg(),
            load_end: String::new(),
            rabbitmq_version: rabbitmq_version().await,
            postgres_version: postgres_setting("SELECT version()").await,
            postgres_autovacuum: postgres_setting("SHOW autovacuum").await,
        }
    }

    /// `name=value` pairs for the machine-readable output.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("machine_cores", self.cores.to_string()),
            ("machine_ram_mb", self.ram_mb.to_string()),
            ("machine_load_start", self.load_start.replace(' ', ",")),
            ("machine_load_end", self.load_end.replace(' ', ",")),
            ("machine_rabbitmq_version", self.rabbitmq_version.clone()),
            (
                "machine_postgres_version",
                short_pg_version(&self.postgres_version),
            ),
            (
                "machine_postgres_autovacuum",
                self.postgres_autovacuum.clone(),
            ),
        ]
    }

    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "cores": self.cores,
            "cpu_model": self.cpu_model,
            "ram_mb": self.ram_mb,
            "kernel": self.kernel,
            "loadavg_start": self.load_start,
            "loadavg_end": self.load_end,
            "rabbitmq_version": self.rabbitmq_version,
            "postgres_version": self.postgres_version,
            "postgres_autovacuum": self.postgres_autovacuum,
        })
    }
}

/// Logical cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The 1/5/15-minute load averages, space-separated.
pub fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Peak resident set size of this process in kB (`VmHWM`).
pub fn peak_rss_kb() -> u64 {
    status_kb("VmHWM:").unwrap_or(0)
}

/// Current resident set size of this process in kB (`VmRSS`).
pub fn rss_kb() -> u64 {
    status_kb("VmRSS:").unwrap_or(0)
}

/// Resets the peak RSS to the current RSS (Linux ≥ 4.0: `echo 5 > /proc/self/clear_refs`), so
/// each suite reports its own peak. Returns false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_kb(key: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string("/proc/self/status").ok()?, key)
}

fn meminfo_kb(key: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown: {e}"))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

async fn rabbitmq_version() -> String {
    match tokio::process::Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .await
    {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        Ok(out) => format!("unknown: {}", String::from_utf8_lossy(&out.stderr).trim()),
        Err(e) => format!("unknown: {e}"),
    }
}

/// The one text value `query` returns on the server's `postgres` database.
async fn postgres_setting(query: &str) -> String {
    let url = format!("{}/postgres", lc_testkit::harness::postgres_base());
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            let task = tokio::spawn(conn);
            let value = client
                .query_one(query, &[])
                .await
                .map(|r| r.get::<_, String>(0))
                .unwrap_or_else(|e| format!("unknown: {e}"));
            drop(client);
            task.abort();
            value
        }
        Err(e) => format!("unknown: {e}"),
    }
}

/// `PostgreSQL 15.14 (Debian …) on x86_64…` → `15.14`.
fn short_pg_version(full: &str) -> String {
    full.split_whitespace().nth(1).unwrap_or(full).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields() {
        assert_eq!(
            kb_field("VmHWM:\t  1234 kB\nVmRSS: 10 kB", "VmRSS:"),
            Some(10)
        );
        assert_eq!(kb_field("x", "VmRSS:"), None);
        assert!(rss_kb() > 0);
        assert!(peak_rss_kb() >= rss_kb() / 2);
        assert_eq!(
            short_pg_version("PostgreSQL 15.14 (Debian) on x86_64"),
            "15.14"
        );
    }
}
