//! The `database` check of a worker's `/readyz`: a background task takes a pooled connection
//! and runs `SELECT 1` every [`PROBE_INTERVAL`], bounded by [`PROBE_TIMEOUT`], and keeps the
//! outcome. `/readyz` reads the kept outcome, so a probe storm (or a slow database) never
//! piles queries up behind the endpoint, and the answer is at most one interval old.
//!
//! A worker that cannot reach its database is not ready: its consumers hold their batches
//! and retry, dispatch pauses — it cannot do its job, and the reason says why.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deadpool_postgres::Pool;
use lc_shared::readiness::{Check, scrub_url_secrets};
use lc_shared::shutdown::Shutdown;
use tokio::task::JoinSet;

/// How often the database is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// How long one probe may take (getting a connection included) before it counts as failed.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The kept outcome of the probe. Cheap to clone: clones share it.
#[derive(Debug, Clone)]
pub struct DbProbe {
    last: Arc<Mutex<Check>>,
}

impl DbProbe {
    /// Spawns the probe into `tasks` until `shutdown`. `url` is `DATABASE_URL`, only used to
    /// remove its password from a reason. Starts passing: the worker reached the database to
    /// migrate before it got here.
    pub fn spawn(tasks: &mut JoinSet<()>, pool: Pool, url: &str, shutdown: &Shutdown) -> Self {
        let probe = Self {
            last: Arc::new(Mutex::new(Check::pass())),
        };
        let (kept, url, stop) = (probe.clone(), url.to_owned(), shutdown.clone());
        tasks.spawn(async move {
            loop {
                let check = match probe_once(&pool).await {
                    Ok(()) => Check::pass(),
                    Err(reason) => Check::fail(scrub_url_secrets(&reason, &url)),
                };
                kept.set(check);
                tokio::select! {
                    () = tokio::time::sleep(PROBE_INTERVAL) => {}
                    () = stop.wait() => return,
                }
            }
        });
        probe
    }

    /// The outcome of the latest probe.
    pub fn check(&self) -> Check {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, check: Check) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = check;
    }
}

/// One `SELECT 1` on a pooled connection, within [`PROBE_TIMEOUT`].
async fn probe_once(pool: &Pool) -> Result<(), String> {
    let attempt = async {
        let client = pool.get().await.map_err(|e| {
            format!(
                "cannot get a database connection: {e} (check DATABASE_URL and that \
                     PostgreSQL is running)"
            )
        })?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| format!("the database did not answer SELECT 1: {e}"))?;
        Ok(())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no database connection answered within {PROBE_TIMEOUT:?} (the database is \
             unreachable or slow, or every pooled connection is busy: check DATABASE_URL \
             and DATABASE_POOL_SIZE)"
        )),
    }
}
