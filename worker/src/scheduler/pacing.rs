//! Per-page pacing: a send-rate limit under Meta's 300 calls/s per Page, and pauses.
//!
//! A page is paused in two ways: throttled until a time (Graph said it is rate-limited,
//! possibly with an `estimated_time_to_regain_access`), or stopped until its token changes
//! (Graph said the token is invalid, code 190). While paused, its opt-ins are not claimed:
//! they wait and their deadlines keep running, instead of burning attempts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Spaces calls per page to at most `rate` per second, allowing a burst of one second's worth.
#[derive(Debug)]
pub struct PageRateLimiter {
    interval: Duration,
    burst: Duration,
    next_free: Mutex<HashMap<String, Instant>>,
}

impl PageRateLimiter {
    /// A limiter of `rate` calls per second per page (0 disables it).
    pub fn new(rate: u32) -> Self {
        let interval = if rate == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / rate
        };
        Self {
            interval,
            burst: Duration::from_secs(1),
            next_free: Mutex::new(HashMap::new()),
        }
    }

    /// Reserves the next slot of `page_id` and returns when it may be used.
    pub fn reserve(&self, page_id: &str) -> Instant {
        let now = Instant::now();
        if self.interval.is_zero() {
            return now;
        }
        let mut map = self
            .next_free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = map.entry(page_id.to_owned()).or_insert(now);
        // Unused capacity accumulates up to the burst, not forever.
        let earliest = now.checked_sub(self.burst).unwrap_or(now);
        if *slot < earliest {
            *slot = earliest;
        }
        let at = (*slot).max(now.checked_sub(self.burst).unwrap_or(now));
        *slot = at + self.interval;
        at.max(now)
    }
}

/// Why a page is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseReason {
    /// Graph rate-limited the page.
    Throttled,
    /// The page token is invalid; waits for a configuration reload with a new token.
    TokenInvalid,
}

#[derive(Debug, Clone)]
struct Pause {
    until: Option<Instant>,
    reason: PauseReason,
}

/// Pages this replica has paused.
#[derive(Debug, Default)]
pub struct PagePauses {
    pauses: Mutex<HashMap<String, Pause>>,
}

impl PagePauses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pause>> {
        self.pauses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Throttles a page for `for_how_long` (extends, never shortens, a current throttle).
    pub fn throttle(&self, page_id: &str, for_how_long: Duration) {
        let until = Instant::now() + for_how_long;
        let mut map = self.lock();
        let entry = map.entry(page_id.to_owned()).or_insert(Pause {
            until: Some(until),
            reason: PauseReason::Throttled,
        });
        if entry.reason == PauseReason::Throttled && entry.until.is_some_and(|u| u < until) {
            entry.until = Some(until);
        }
    }

    /// Stops a page until its token changes.
    pub fn stop_for_token(&self, page_id: &str) {
        self.lock().insert(
            page_id.to_owned(),
            Pause {
                until: None,
                reason: PauseReason::TokenInvalid,
            },
        );
    }

    /// Lifts a token pause (the page's token was changed by a reload).
    pub fn resume(&self, page_id: &str) -> bool {
        self.lock().remove(page_id).is_some()
    }

    /// Whether the page is paused now, and why.
    pub fn paused(&self, page_id: &str) -> Option<PauseReason> {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get(page_id) {
            Some(p) if p.until.is_none_or(|u| u > now) => Some(p.reason.clone()),
            Some(_) => {
                map.remove(page_id);
                None
            }
            None => None,
        }
    }

    /// Pages paused now (for the claim query to skip).
    pub fn paused_pages(&self) -> Vec<String> {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, p| p.until.is_none_or(|u| u > now));
        map.keys().cloned().collect()
    }

    /// Pages stopped for an invalid token (for the metric and `status`).
    pub fn token_paused_pages(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, p)| p.reason == PauseReason::TokenInvalid)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_spaces_calls_after_the_burst() {
        let limiter = PageRateLimiter::new(10);
        let start = Instant::now();
        // The first second's worth goes at once.
        let first: Vec<Instant> = (0..10).map(|_| limiter.reserve("p")).collect();
        assert!(
            first
                .iter()
                .all(|t| *t <= start + Duration::from_millis(1000))
        );
        let later = limiter.reserve("p");
        assert!(later >= start, "{later:?}");
        // Another page is independent.
        assert_eq!(limiter.reserve("q"), Instant::now());
        // 30 reservations at 10/s need about two seconds beyond the burst.
        let mut last = later;
        for _ in 0..20 {
            last = limiter.reserve("p");
        }
        assert!(
            last >= start + Duration::from_millis(1900),
            "{:?}",
            last - start
        );
    }

    #[tokio::test(start_paused = true)]
    async fn throttles_expire_and_token_pauses_wait_for_resume() {
        let pauses = PagePauses::default();
        pauses.throttle("p", Duration::from_secs(5));
        pauses.stop_for_token("q");
        assert_eq!(pauses.paused("p"), Some(PauseReason::Throttled));
        let mut paused = pauses.paused_pages();
        paused.sort();
        assert_eq!(paused, vec!["p", "q"]);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(pauses.paused("p"), None);
        assert_eq!(pauses.paused("q"), Some(PauseReason::TokenInvalid));
        assert_eq!(pauses.token_paused_pages(), vec!["q"]);
        assert!(pauses.resume("q"));
        assert!(pauses.paused_pages().is_empty());
    }
}
