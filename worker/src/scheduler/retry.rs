//! When to try again: exponential backoff with full jitter, capped, never past the deadline.
//!
//! The delay is computed here rather than slept in a task because retries are durable: the
//! next attempt time is stored on the opt-in row and any replica may make it.

use std::time::Duration;

use time::OffsetDateTime;

/// Backoff parameters.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Delay ceiling of the first retry (the jittered delay is drawn from 0..=base).
    pub base: Duration,
    /// Largest delay ceiling.
    pub cap: Duration,
}

/// The outcome of planning the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextAttempt {
    /// Try again at this time.
    At(OffsetDateTime),
    /// No attempt fits before the last allowed send time: the opt-in expires.
    NoTimeLeft,
}

impl RetryPolicy {
    /// Ceiling of the delay after `attempts` failed attempts (1 = after the first failure):
    /// `min(cap, base · 2^(attempts-1))`.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        self.base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// Plans the next attempt after `attempts` failures. `at_least` is a lower bound imposed
    /// by Graph (rate-limit regain time, Retry-After); `last_send` is the deadline minus the
    /// safety margin, at or after which no call may start. `jitter` is a number in [0, 1]
    /// (full jitter: the delay is drawn uniformly from zero to the ceiling).
    pub fn next(
        &self,
        now: OffsetDateTime,
        attempts: u32,
        at_least: Option<Duration>,
        last_send: OffsetDateTime,
        jitter: f64,
    ) -> NextAttempt {
        let ceiling = self.ceiling(attempts);
        let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
        let delay = jittered.max(at_least.unwrap_or(Duration::ZERO));
        let at = now + delay;
        if at >= last_send {
            NextAttempt::NoTimeLeft
        } else {
            NextAttempt::At(at)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        }
    }

    #[test]
    fn ceiling_grows_exponentially_up_to_the_cap() {
        let p = policy();
        let got: Vec<u64> = (1..=8).map(|a| p.ceiling(a).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.ceiling(1000), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = policy();
        let now = OffsetDateTime::UNIX_EPOCH;
        let far = now + Duration::from_secs(3600);
        assert_eq!(p.next(now, 3, None, far, 0.0), NextAttempt::At(now));
        assert_eq!(
            p.next(now, 3, None, far, 1.0),
            NextAttempt::At(now + Duration::from_secs(4))
        );
        assert_eq!(
            p.next(now, 3, None, far, 0.5),
            NextAttempt::At(now + Duration::from_secs(2))
        );
    }

    #[test]
    fn graph_imposed_delays_are_honoured() {
        let p = policy();
        let now = OffsetDateTime::UNIX_EPOCH;
        let far = now + Duration::from_secs(3600);
        assert_eq!(
            p.next(now, 1, Some(Duration::from_secs(300)), far, 0.3),
            NextAttempt::At(now + Duration::from_secs(300))
        );
    }

    #[test]
    fn never_scheduled_at_or_past_the_last_send_time() {
        let p = policy();
        let now = OffsetDateTime::UNIX_EPOCH;
        let last = now + Duration::from_secs(4);
        assert_eq!(p.next(now, 3, None, last, 1.0), NextAttempt::NoTimeLeft);
        assert_eq!(
            p.next(now, 1, Some(Duration::from_secs(10)), last, 0.0),
            NextAttempt::NoTimeLeft
        );
        assert!(matches!(
            p.next(now, 3, None, last, 0.5),
            NextAttempt::At(_)
        ));
    }
}
