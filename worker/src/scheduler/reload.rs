//! Re-reading the pages file on SIGHUP: a page whose token changed is resumed.

use std::path::PathBuf;
use std::sync::Arc;

use lc_meta::pages::PagesConfig;
use lc_shared::shutdown::Shutdown;
use tokio::sync::RwLock;

use super::metrics::SchedulerMetrics;
use super::pacing::PagePauses;

/// Re-reads the pages file on SIGHUP; pages whose token changed are resumed.
pub async fn reload_on_sighup(
    path: PathBuf,
    pages: Arc<RwLock<Arc<PagesConfig>>>,
    pauses: Arc<PagePauses>,
    metrics: SchedulerMetrics,
    shutdown: Shutdown,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; page configuration reload disabled");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                () = shutdown.wait() => return,
            }
            match PagesConfig::load(&path) {
                Ok(new) => {
                    let old = pages.read().await.clone();
                    for page in &new.pages {
                        let changed = old
                            .get(&page.id)
                            .is_none_or(|o| o.access_token != page.access_token);
                        if changed && pauses.resume(&page.id) {
                            metrics
                                .paused_pages
                                .with_label_values(&[page.id.as_str()])
                                .set(0);
                            tracing::info!(page_id = %page.id, "page token changed; sends resumed");
                        }
                    }
                    *pages.write().await = Arc::new(new);
                    tracing::info!(path = %path.display(), "pages file reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "pages file reload failed; keeping the previous configuration")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, pages, pauses, metrics);
        shutdown.wait().await;
    }
}
