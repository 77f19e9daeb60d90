//! The pages this replica sends for, kept current without a restart: the pages file (polled
//! by content every second, and re-read at once on SIGHUP) with page tokens stored in the
//! database (`loginconnect pages set-token`) laid over it, and the shared page state synced
//! after every change — which resumes, on every replica, a page paused for a token it no
//! longer uses.

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

/// How often the file and the stored tokens are looked at.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often the page state is synced even without a change (a pause written by a replica
/// that still had an old token is lifted by the next sync of one that has the new one).
const SYNC_EVERY: Duration = Duration::from_secs(10);

/// Where a replica's pages come from.
#[derive(Debug, Clone)]
pub struct PageSource {
    /// The pages file.
    pub path: PathBuf,
    /// Keys of tokens stored in the database.
    pub keys: TokenKeys,
    /// `PAGE_RATE_LIMIT`, written to each page's state.
    pub rate_limit: u32,
}

/// What a load saw, to tell whether anything changed since.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seen {
    file: [u8; 32],
    tokens: Vec<(String, String, time::OffsetDateTime)>,
}

impl PageSource {
    /// Reads the file and the stored tokens; the pages with the stored tokens laid over.
    async fn read(&self, pool: &Pool) -> Result<(PagesConfig, Seen), String> {
        // A small file, read off the async threads.
        let path = self.path.clone();
        let text = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot read {}: {e}", self.path.display()))?;
        let file: [u8; 32] = Sha256::digest(&text).into();
        let text =
            String::from_utf8(text).map_err(|_| format!("{} is not UTF-8", self.path.display()))?;
        let mut config = PagesConfig::parse(&text, &|name| std::env::var(name).ok())
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        let client = pool.get().await.map_err(|e| e.to_string())?;
        let stored = pages::load_tokens(&client)
            .await
            .map_err(|e| e.to_string())?;
        let mut tokens = Vec::with_capacity(stored.len());
        for row in &stored {
            tokens.push((row.page_id.clone(), row.fingerprint.clone(), row.updated_at));
            let Some(page) = config.pages.iter_mut().find(|p| p.id == row.page_id) else {
                continue;
            };
            match self.keys.open(row) {
                Ok(token) => page.access_token = token,
                Err(e) => {
                    tracing::error!(page_id = %row.page_id, error = %e, "keeping the pages file's token")
                }
            }
        }
        tokens.sort();
        Ok((config, Seen { file, tokens }))
    }

    /// Loads the pages at start-up and syncs the shared page state.
    pub async fn load(&self, pool: &Pool) -> Result<PagesConfig, String> {
        let (config, _) = self.read(pool).await?;
        sync(pool, &config, self.rate_limit)
            .await
            .map_err(|e| format!("cannot record the pages' state: {e}"))?;
        Ok(config)
    }
}

/// Writes every page's state row and resumes pages whose token changed.
async fn sync(pool: &Pool, config: &PagesConfig, rate_limit: u32) -> Result<(), StoreError> {
    let list: Vec<PageSync<'_>> = config
        .pages
        .iter()
        .map(|p| PageSync {
            page_id: &p.id,
            token_fingerprint: fingerprint(p.access_token.expose()),
        })
        .collect();
    let mut client = pool.get().await?;
    for page_id in pages::sync(&mut client, &list, rate_limit).await? {
        tracing::info!(
            page_id,
            "page token changed; sends resumed on every replica"
        );
    }
    Ok(())
}

/// Keeps `current` in step with the source until `shutdown`.
pub async fn watch(
    source: PageSource,
    pool: Pool,
    current: Arc<RwLock<Arc<PagesConfig>>>,
    metrics: SchedulerMetrics,
    shutdown: Shutdown,
) {
    let mut seen = match source.read(&pool).await {
        Ok((_, seen)) => seen,
        Err(_) => Seen::default(),
    };
    let mut hup = sighup();
    let mut last_sync = std::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(POLL_EVERY) => {}
            () = next_hup(&mut hup) => {}
            () = shutdown.wait() => return,
        }
        match source.read(&pool).await {
            Ok((config, now_seen)) => {
                let changed = now_seen != seen;
                if changed {
                    for page in &config.pages {
                        metrics.paused_pages.with_label_values(&[page.id.as_str()]);
                    }
                    *current.write().await = Arc::new(config.clone());
                    tracing::info!(path = %source.path.display(), "pages reloaded");
                    seen = now_seen;
                }
                if changed || last_sync.elapsed() >= SYNC_EVERY {
                    last_sync = std::time::Instant::now();
                    if let Err(e) = sync(&pool, &config, source.rate_limit).await {
                        tracing::warn!(error = %e, "cannot sync the pages' state; retrying");
                    }
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
