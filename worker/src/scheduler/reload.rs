//! The pages this replica sends for, kept current without a restart: the page registry
//! ([`crate::registry`]) read again whenever its version moves (polled every half second),
//! the pages file imported into it whenever the file changes (polled by content as often,
//! and at once on SIGHUP), and the shared page state synced after every change — which
//! resumes, on every replica, a page paused for a token it no longer uses.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use lc_meta::pages::PagesConfig;
use lc_shared::shutdown::Shutdown;
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;

use super::metrics::SchedulerMetrics;
use super::store::StoreError;
use super::store::pages::{self, PageSync};
use super::tokens::{TokenKeys, fingerprint};
use crate::registry::view::{self, RegistryView};
use crate::registry::{import, store as registry_store};

/// How often the file and the registry's version are looked at (shared with ingest's
/// bindings).
pub use lc_shared::registry::POLL_EVERY;
/// How often the page state is synced even without a change (a pause written by a replica
/// that still had an old token is lifted by the next sync of one that has the new one).
const SYNC_EVERY: Duration = Duration::from_secs(10);

/// Where a replica's pages come from.
#[derive(Debug, Clone)]
pub struct PageSource {
    /// The pages file, if the deployment has one (imported into the registry).
    pub path: Option<PathBuf>,
    /// Keys of tokens stored in the database.
    pub keys: TokenKeys,
    /// `PAGE_RATE_LIMIT`, for pages without a limit of their own.
    pub rate_limit: u32,
}

/// The pages file as last read.
#[derive(Debug, Clone, Default)]
struct FileSeen {
    hash: [u8; 32],
    config: Option<PagesConfig>,
}

impl PageSource {
    /// Reads and validates the pages file; `None` without one. The hash tells a change.
    async fn read_file(&self) -> Result<Option<([u8; 32], PagesConfig)>, String> {
        let Some(path) = self.path.clone() else {
            return Ok(None);
        };
        // A small file, read off the async threads.
        let shown = path.display().to_string();
        let text = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot read {shown}: {e}"))?;
        let hash: [u8; 32] = Sha256::digest(&text).into();
        let text = String::from_utf8(text).map_err(|_| format!("{shown} is not UTF-8"))?;
        let config = PagesConfig::parse(&text, &|name| std::env::var(name).ok())
            .map_err(|e| format!("{shown}: {e}"))?;
        Ok(Some((hash, config)))
    }

    /// Imports the file into the registry.
    async fn import(&self, pool: &Pool, file: &PagesConfig) -> Result<(), String> {
        let mut client = pool.get().await.map_err(|e| e.to_string())?;
        let report = import::import_file(&mut client, file).await.map_err(|e| {
            format!(
                "cannot import the pages file into the registry: {e} (a database older than \
                     this version needs `loginconnect migrate` first)"
            )
        })?;
        if !report.created.is_empty() || !report.updated.is_empty() {
            tracing::info!(created = ?report.created, updated = ?report.updated, unchanged = report.unchanged, "pages file imported into the registry");
        }
        Ok(())
    }

    /// The registry's version, then this replica's view (read in that order: a change
    /// between the two is seen again at the next poll).
    async fn view(
        &self,
        pool: &Pool,
        file: Option<&PagesConfig>,
    ) -> Result<(i64, RegistryView), String> {
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let version = registry_store::version(&client)
            .await
            .map_err(|e| e.to_string())?;
        let view = view::build(&client, file, &self.keys, &|name| std::env::var(name).ok())
            .await
            .map_err(|e| e.to_string())?;
        Ok((version, view))
    }

    /// Imports the pages file, loads the pages at start-up and syncs the shared page state.
    pub async fn load(&self, pool: &Pool) -> Result<PagesConfig, String> {
        let file = self.read_file().await?;
        if let Some((_, config)) = &file {
            self.import(pool, config).await?;
        }
        let (_, view) = self.view(pool, file.as_ref().map(|(_, c)| c)).await?;
        report_left_out(&view);
        sync(pool, &view, self.rate_limit)
            .await
            .map_err(|e| format!("cannot record the pages' state: {e}"))?;
        Ok(view.config)
    }
}

fn report_left_out(view: &RegistryView) {
    if !view.left_out.is_empty() {
        tracing::warn!(pages = ?view.left_out, "pages of the registry without a token on this replica: nothing is sent for them until one is set (`loginconnect pages set-token` or the admin API)");
    }
}

/// Writes every page's state row and resumes pages whose token changed.
async fn sync(pool: &Pool, view: &RegistryView, rate_limit: u32) -> Result<(), StoreError> {
    let list: Vec<PageSync<'_>> = view
        .config
        .pages
        .iter()
        .map(|p| PageSync {
            page_id: &p.id,
            token_fingerprint: fingerprint(p.access_token.expose()),
            rate_limit: view.rate_limits.get(&p.id).copied().unwrap_or(rate_limit),
        })
        .collect();
    let mut client = pool.get().await?;
    for page_id in pages::sync(&mut client, &list).await? {
        tracing::info!(
            page_id,
            "page token changed; sends resumed on every replica"
        );
    }
    Ok(())
}

/// Keeps `current` in step with the registry (and the file) until `shutdown`.
pub async fn watch(
    source: PageSource,
    pool: Pool,
    current: Arc<RwLock<Arc<PagesConfig>>>,
    metrics: SchedulerMetrics,
    shutdown: Shutdown,
) {
    let mut file = match source.read_file().await {
        Ok(Some((hash, config))) => FileSeen {
            hash,
            config: Some(config),
        },
        _ => FileSeen::default(),
    };
    let mut version = None;
    let mut hup = sighup();
    let mut last_sync = std::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_EVERY) => {}
            () = next_hup(&mut hup) => {}
            () = shutdown.wait() => return,
        }
        let mut file_changed = false;
        match source.read_file().await {
            Ok(Some((hash, config))) if hash != file.hash => {
                match source.import(&pool, &config).await {
                    Ok(()) => {
                        file = FileSeen {
                            hash,
                            config: Some(config),
                        };
                        file_changed = true;
                    }
                    Err(e) => tracing::error!(error = %e, "pages file not imported; retrying"),
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "pages file reload failed; keeping the previous one")
            }
        }
        let polled = {
            let client = pool.get().await.map_err(|e| e.to_string());
            match client {
                Ok(c) => registry_store::version(&c).await.map_err(|e| e.to_string()),
                Err(e) => Err(e),
            }
        };
        let moved = match polled {
            Ok(v) => version != Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the registry's version; retrying");
                false
            }
        };
        if !(moved || file_changed || last_sync.elapsed() >= SYNC_EVERY) {
            continue;
        }
        match source.view(&pool, file.config.as_ref()).await {
            Ok((v, view)) => {
                if moved || file_changed {
                    for page in &view.config.pages {
                        metrics.paused_pages.with_label_values(&[page.id.as_str()]);
                        metrics
                            .unsubscribed_pages
                            .with_label_values(&[page.id.as_str()]);
                    }
                    report_left_out(&view);
                    let changed = **current.read().await != view.config;
                    if changed {
                        *current.write().await = Arc::new(view.config.clone());
                        tracing::info!(version = v, "pages reloaded from the registry");
                    }
                    version = Some(v);
                }
                last_sync = std::time::Instant::now();
                if let Err(e) = sync(&pool, &view, source.rate_limit).await {
                    tracing::warn!(error = %e, "cannot sync the pages' state; retrying");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "pages reload failed; keeping the previous configuration")
            }
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn sighup() -> Hangup {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup())
        .map_err(|e| tracing::warn!(error = %e, "cannot listen for SIGHUP; polling only"))
        .ok()
}

#[cfg(not(unix))]
fn sighup() -> Hangup {
    None
}

/// The next SIGHUP (never, where there is none).
async fn next_hup(hup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hup {
        signal.recv().await;
        return;
    }
    let _ = hup;
    std::future::pending::<()>().await
}
