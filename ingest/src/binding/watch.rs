//! The bindings in use, kept current from the registry: its version is polled every
//! [`POLL_EVERY`] (like the scheduler's pages) and the keys rebuilt when it moved. When the
//! database cannot be read, the last keys stay in use (ingest keeps answering), the failure
//! is logged once per outage and counted, and `ingest_bindings_stale` is 1 until a read
//! succeeds again.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use lc_meta::secret::Secret;
use lc_shared::registry::{self, Bindings, POLL_EVERY};
use lc_shared::shutdown::Shutdown;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::keys::Keys;
use super::{Refusal, SecretVars};
use crate::error::IngestError;

/// Connections of the bindings' pool: one poll at a time.
const POOL_SIZE: usize = 2;
/// Bound on one read of the registry: a database that stops answering (a dropped route, a
/// failover in progress) must not hold the poll, which would leave the bindings stale
/// without saying so. Also bounds how long start-up waits for the first read.
const READ_BOUND: Duration = Duration::from_secs(2);

/// The metrics of app binding.
#[derive(Clone)]
pub struct BindingMetrics {
    /// Entries set aside because their page's app did not sign, by reason.
    pub refused: IntCounterVec,
    /// Failed reads of the registry.
    pub read_failures: IntCounter,
    /// 1 while the bindings in use may be out of date (the last read failed, or none yet).
    pub stale: IntGauge,
    /// Pages bound to an app, as last read.
    pub bound_pages: IntGauge,
}

impl BindingMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            refused: IntCounterVec::new(
                Opts::new(
                    "ingest_entries_refused_total",
                    "Entries of signed deliveries set aside on messenger.unparsed because the \
                     page is bound to an app whose secret did not sign them, by reason",
                ),
                &["reason"],
            )?,
            read_failures: IntCounter::new(
                "ingest_registry_read_failures_total",
                "Failed reads of the page registry's bindings (the last ones stay in use)",
            )?,
            stale: IntGauge::new(
                "ingest_bindings_stale",
                "1 while the app bindings in use may be out of date (the registry could not \
                 be read)",
            )?,
            bound_pages: IntGauge::new(
                "ingest_bound_pages",
                "Pages bound to an app in the registry, as last read",
            )?,
        };
        for reason in Refusal::REASONS {
            m.refused.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.read_failures.clone()))?;
        registry.register(Box::new(m.stale.clone()))?;
        registry.register(Box::new(m.bound_pages.clone()))?;
        Ok(m)
    }
}

/// Where [`BindingsView::keys`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// No `DATABASE_URL`: `META_APP_SECRETS` for every page, as before the registry.
    Fixed,
    /// The registry, read at least once.
    Registry,
    /// The registry, never read yet: deliveries are answered 503 (Meta redelivers) rather
    /// than accepted without knowing the bindings.
    NotYetRead,
}

/// The keys in use, shared by every request.
#[derive(Clone)]
pub struct BindingsView {
    current: Arc<RwLock<(Source, Arc<Keys>)>>,
}

/// What the poll task needs.
struct Poller {
    pool: Pool,
    base: Vec<Secret>,
    vars: SecretVars,
    accept_sha1: bool,
    metrics: BindingMetrics,
    view: BindingsView,
}

impl BindingsView {
    /// Bindings without a database: every known secret signs every page.
    pub fn fixed(base: &[Secret], accept_sha1: bool) -> Self {
        let keys = Keys::build(
            base,
            &Bindings::default(),
            &SecretVars::default(),
            accept_sha1,
        );
        Self {
            current: Arc::new(RwLock::new((Source::Fixed, Arc::new(keys)))),
        }
    }

    /// Bindings from the registry at `url`: read once now (a failure is logged and retried
    /// in the background), then kept current until `shutdown`.
    pub async fn from_registry(
        url: &Secret,
        base: Vec<Secret>,
        vars: SecretVars,
        accept_sha1: bool,
        metrics: BindingMetrics,
        shutdown: Shutdown,
    ) -> Result<Self, IngestError> {
        let pool = lc_shared::db::pool(url.expose(), POOL_SIZE)
            .map_err(|e| IngestError::Config(format!("DATABASE_URL: {e}")))?;
        let keys = Keys::build(&base, &Bindings::default(), &vars, accept_sha1);
        let view = Self {
            current: Arc::new(RwLock::new((Source::NotYetRead, Arc::new(keys)))),
        };
        metrics.stale.set(1);
        let poller = Poller {
            pool,
            base,
            vars,
            accept_sha1,
            metrics,
            view: view.clone(),
        };
        let mut version = poller.poll(None).await;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(POLL_EVERY) => {}
                    () = shutdown.wait() => return,
                }
                version = poller.poll(version).await;
            }
        });
        Ok(view)
    }

    /// The keys in use and where they come from.
    pub fn keys(&self) -> (Source, Arc<Keys>) {
        let guard = self.current.read().unwrap_or_else(PoisonError::into_inner);
        (guard.0, Arc::clone(&guard.1))
    }

    fn set(&self, keys: Keys) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) =
            (Source::Registry, Arc::new(keys));
    }
}

impl Poller {
    /// Reads the version and, when it moved from `seen`, the bindings; returns the version
    /// in use afterwards. One log line per outage, not one per poll.
    async fn poll(&self, seen: Option<i64>) -> Option<i64> {
        let read = tokio::time::timeout(READ_BOUND, self.read(seen))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {READ_BOUND:?}")));
        match read {
            Ok(Some((version, bindings))) => {
                self.metrics
                    .bound_pages
                    .set(i64::try_from(bindings.page_app.len()).unwrap_or(i64::MAX));
                let keys = Keys::build(&self.base, &bindings, &self.vars, self.accept_sha1);
                self.view.set(keys);
                self.metrics.stale.set(0);
                tracing::info!(
                    version,
                    apps = bindings.app_secret_env.len(),
                    bound_pages = bindings.page_app.len(),
                    "app bindings read from the registry"
                );
                Some(version)
            }
            Ok(None) => {
                if self.metrics.stale.get() == 1 {
                    tracing::info!("page registry readable again; app bindings current");
                }
                self.metrics.stale.set(0);
                seen
            }
            Err(e) => {
                self.metrics.read_failures.inc();
                let outage_begins =
                    self.metrics.stale.get() == 0 || self.metrics.read_failures.get() == 1;
                self.metrics.stale.set(1);
                if outage_begins {
                    tracing::warn!(error = %e, "cannot read the page registry's app bindings; keeping the last ones (retrying every half second)");
                }
                seen
            }
        }
    }

    async fn read(&self, seen: Option<i64>) -> Result<Option<(i64, Bindings)>, String> {
        let client = self.pool.get().await.map_err(|e| e.to_string())?;
        let version = registry::version(&client)
            .await
            .map_err(|e| lc_shared::db::describe(&e))?;
        if seen == Some(version) {
            return Ok(None);
        }
        let bindings = registry::bindings(&client)
            .await
            .map_err(|e| lc_shared::db::describe(&e))?;
        Ok(Some((version, bindings)))
    }
}
