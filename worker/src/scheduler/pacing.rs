//! What this replica knows of the cluster's page holds (pauses and throttles), refreshed from
//! `page_state` at least once a second.
//!
//! The send budget itself needs no local state: each claim takes its rows' slots from the
//! database (see `store::claim`). Holds are also applied there, but rows claimed just before
//! a hold began may still be waiting for their slot; the dispatcher checks this snapshot right
//! before each call, so a pause written by any replica stops every replica's calls within a
//! refresh. A hold this replica decides itself applies here at once, before the next refresh.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use lc_shared::shutdown::Shutdown;
use time::OffsetDateTime;

use super::metrics::SchedulerMetrics;
use super::store::pages::{self, PageHold, PauseReason};

/// How often the snapshot is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// How long a hold noted here outlives a snapshot that does not show it yet (the snapshot
/// may have been read before this replica's write landed).
const LOCAL_GRACE: Duration = Duration::from_secs(2);

/// Why a page may not be called now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Paused until someone acts.
    Paused(PauseReason),
    /// Throttled (the page, or the whole app) for a while.
    Throttled,
}

impl Blocked {
    /// Why, for a log line.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Paused(PauseReason::TokenInvalid) => "the page is paused: its token is invalid",
            Self::Paused(PauseReason::Restricted) => "the page is paused: Graph restricted it",
            Self::Paused(PauseReason::Operator) => "the page is paused by an operator",
            Self::Throttled => "the page (or the app) is throttled",
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Hold {
    paused: Option<PauseReason>,
    throttled_until: Option<Instant>,
    /// Set when this replica noted the hold itself.
    noted_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Snapshot {
    pages: HashMap<String, Hold>,
    app_throttled_until: Option<Instant>,
}

/// The holds in force, as last read (plus this replica's own since).
#[derive(Debug, Default)]
pub struct PageHolds {
    inner: Mutex<Snapshot>,
}

/// An absolute database time as an instant on this process's clock.
fn instant_of(at: OffsetDateTime) -> Instant {
    let left = at - OffsetDateTime::now_utc();
    Instant::now() + Duration::try_from(left).unwrap_or(Duration::ZERO)
}

impl PageHolds {
    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the snapshot with the database's, keeping this replica's recent notes.
    pub fn replace(&self, holds: Vec<PageHold>) {
        let now = Instant::now();
        let mut snap = self.lock();
        let mut pages: HashMap<String, Hold> = snap
            .pages
            .drain()
            .filter(|(_, h)| {
                h.noted_at
                    .is_some_and(|t| now.duration_since(t) < LOCAL_GRACE)
            })
            .collect();
        let mut app = snap.app_throttled_until.filter(|until| *until > now);
        for h in holds {
            let until = h.throttled_until.map(instant_of);
            match h.page_id {
                None => app = app.max(until),
                Some(page) => {
                    let entry = pages.entry(page).or_default();
                    entry.paused = entry.paused.or(h.paused);
                    entry.throttled_until = entry.throttled_until.max(until);
                }
            }
        }
        snap.pages = pages;
        snap.app_throttled_until = app;
    }

    /// Notes a pause decided here.
    pub fn note_pause(&self, page_id: &str, reason: PauseReason) {
        let mut snap = self.lock();
        let hold = snap.pages.entry(page_id.to_owned()).or_default();
        hold.paused = Some(reason);
        hold.noted_at = Some(Instant::now());
    }

    /// Notes a throttle decided here.
    pub fn note_throttle(&self, page_id: &str, for_how_long: Duration) {
        let until = Instant::now() + for_how_long;
        let mut snap = self.lock();
        let hold = snap.pages.entry(page_id.to_owned()).or_default();
        hold.throttled_until = hold.throttled_until.max(Some(until));
        hold.noted_at = Some(Instant::now());
    }

    /// Notes an app-wide throttle decided here.
    pub fn note_app_throttle(&self, for_how_long: Duration) {
        let until = Instant::now() + for_how_long;
        let mut snap = self.lock();
        snap.app_throttled_until = snap.app_throttled_until.max(Some(until));
    }

    /// Whether `page_id` may not be called now, and why.
    pub fn blocked(&self, page_id: &str) -> Option<Blocked> {
        let now = Instant::now();
        let snap = self.lock();
        if let Some(h) = snap.pages.get(page_id) {
            if let Some(reason) = h.paused {
                return Some(Blocked::Paused(reason));
            }
            if h.throttled_until.is_some_and(|u| u > now) {
                return Some(Blocked::Throttled);
            }
        }
        snap.app_throttled_until
            .filter(|u| *u > now)
            .map(|_| Blocked::Throttled)
    }

    /// Pages paused now, with why.
    pub fn paused_pages(&self) -> Vec<(String, PauseReason)> {
        self.lock()
            .pages
            .iter()
            .filter_map(|(page, h)| h.paused.map(|r| (page.clone(), r)))
            .collect()
    }
}

/// Refreshes `holds` from the database every [`REFRESH_EVERY`] until `shutdown`, and keeps
/// the paused-pages gauge in step with it.
pub async fn refresh(
    pool: Pool,
    holds: std::sync::Arc<PageHolds>,
    metrics: SchedulerMetrics,
    shutdown: Shutdown,
) {
    let mut shown: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        let loaded = match pool.get().await {
            Ok(mut client) => {
                // Throttles that ran out are announced (`page.resumed`) by whichever replica
                // sees it first, within a second of the end.
                match pages::announce_throttle_ends(&mut client).await {
                    Ok(ended) if !ended.is_empty() => {
                        tracing::info!(pages = ?ended, "page throttles ended; sends resumed");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot announce ended throttles"),
                }
                pages::load_pauses(&client).await
            }
            Err(e) => Err(e.into()),
        };
        match loaded {
            Ok(list) => holds.replace(list),
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh page holds; keeping the last ones");
                continue;
            }
        }
        let paused: Vec<String> = holds.paused_pages().into_iter().map(|(p, _)| p).collect();
        for page in shown.iter().filter(|p| !paused.contains(p)) {
            metrics.paused_pages.with_label_values(&[page]).set(0);
        }
        for page in &paused {
            metrics.paused_pages.with_label_values(&[page]).set(1);
        }
        shown = paused;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_pauses_and_throttles_block_and_a_newer_snapshot_lifts_them() {
        let holds = PageHolds::default();
        let soon = OffsetDateTime::now_utc() + Duration::from_secs(60);
        holds.replace(vec![
            PageHold {
                page_id: Some("p".into()),
                paused: Some(PauseReason::TokenInvalid),
                throttled_until: None,
            },
            PageHold {
                page_id: Some("q".into()),
                paused: None,
                throttled_until: Some(soon),
            },
        ]);
        assert_eq!(
            holds.blocked("p"),
            Some(Blocked::Paused(PauseReason::TokenInvalid))
        );
        assert_eq!(holds.blocked("q"), Some(Blocked::Throttled));
        assert_eq!(holds.blocked("r"), None);
        holds.replace(Vec::new());
        assert_eq!(holds.blocked("p"), None, "resumed elsewhere");
    }

    #[test]
    fn local_notes_survive_a_snapshot_read_before_they_landed() {
        let holds = PageHolds::default();
        holds.note_pause("p", PauseReason::Restricted);
        holds.replace(Vec::new());
        assert_eq!(
            holds.blocked("p"),
            Some(Blocked::Paused(PauseReason::Restricted))
        );
    }

    #[test]
    fn an_app_throttle_blocks_every_page() {
        let holds = PageHolds::default();
        holds.note_app_throttle(Duration::from_secs(30));
        assert_eq!(holds.blocked("any"), Some(Blocked::Throttled));
        holds.replace(vec![PageHold {
            page_id: None,
            paused: None,
            throttled_until: Some(OffsetDateTime::now_utc() + Duration::from_secs(5)),
        }]);
        assert_eq!(holds.blocked("other"), Some(Blocked::Throttled));
    }
}
