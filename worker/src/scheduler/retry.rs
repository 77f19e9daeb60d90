//! When to try again: exponential backoff with full jitter, capped, never past the deadline.
//!
//! The delay is computed here rather than slept in a task because retries are durable: the
//! next attempt time is stored on the opt-in row and any replica may make it.
//!
//! Near the deadline the jitter is drawn from the time that is left rather than from the
//! full backoff: a retry that still fits is worth more than the backoff's shape, since an
//! opt-in whose retry is planned past the last send time expires unsent.

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

/// Room kept before the last send time when there is enough: a retry planned right at the
/// edge would almost surely find the time passed after its claim and pacing.
const LAST_SEND_GUARD: Duration = Duration::from_secs(1);

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
    /// (full jitter: the delay is drawn uniformly from zero to the ceiling; NaN counts as 1).
    ///
    /// Whenever some time in `[now + at_least, last_send)` exists, the result is such a time:
    /// the jitter is then drawn from zero to the smaller of the ceiling and the time left
    /// (less a guard of one second when that still leaves `at_least`), and the delay is at
    /// least `at_least`. Only when `now + at_least` is at or past `last_send` is there
    /// [`NextAttempt::NoTimeLeft`].
    pub fn next(
        &self,
        now: OffsetDateTime,
        attempts: u32,
        at_least: Option<Duration>,
        last_send: OffsetDateTime,
        jitter: f64,
    ) -> NextAttempt {
        let at_least = at_least.unwrap_or(Duration::ZERO);
        // A negative time left fails the conversion: no time left.
        let Ok(left) = Duration::try_from(last_send - now) else {
            return NextAttempt::NoTimeLeft;
        };
        // Within the last guard interval no retry is planned: pulled ever closer to the last
        // send time, retries would follow each other with ever shorter gaps (a burst of calls
        // for one person in the window's last second).
        if at_least + LAST_SEND_GUARD >= left {
            return NextAttempt::NoTimeLeft;
        }
        // The latest delay that fits: `at_least <= latest < left`, a guard before the end.
        let latest = left - LAST_SEND_GUARD;
        let jitter = if jitter.is_nan() {
            1.0
        } else {
            jitter.clamp(0.0, 1.0)
        };
        let delay = self
            .ceiling(attempts)
            .min(latest)
            .mul_f64(jitter)
            .max(at_least);
        NextAttempt::At(now + delay)
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
        assert_eq!(
            p.next(now, 1, Some(Duration::from_secs(10)), last, 0.0),
            NextAttempt::NoTimeLeft
        );
        assert_eq!(
            p.next(now, 1, Some(Duration::from_secs(4)), last, 0.0),
            NextAttempt::NoTimeLeft,
            "exactly at the last send time is too late"
        );
        assert_eq!(p.next(now, 1, None, now, 0.0), NextAttempt::NoTimeLeft);
        assert_eq!(
            p.next(now, 1, None, now - Duration::from_secs(1), 0.0),
            NextAttempt::NoTimeLeft
        );
        assert!(matches!(
            p.next(now, 3, None, last, 0.5),
            NextAttempt::At(_)
        ));
    }

    /// Failed before the change: a full-jitter draw of 4 s with 4 s left gave `NoTimeLeft`,
    /// and the opt-in expired although a retry at 3 s would have fitted.
    #[test]
    fn a_draw_past_the_last_send_time_is_pulled_back_into_the_time_left() {
        let p = policy();
        let now = OffsetDateTime::UNIX_EPOCH;
        let last = now + Duration::from_secs(4);
        // The ceiling (4 s) is shortened to the time left less the guard (3 s).
        assert_eq!(
            p.next(now, 3, None, last, 1.0),
            NextAttempt::At(now + Duration::from_secs(3))
        );
        assert_eq!(
            p.next(now, 3, None, last, 0.5),
            NextAttempt::At(now + Duration::from_millis(1500))
        );
        // Graph's wait still counts, and fits if it leaves the guard.
        assert_eq!(
            p.next(now, 8, Some(Duration::from_millis(2500)), last, 1.0),
            NextAttempt::At(now + Duration::from_secs(3)),
        );
        assert_eq!(
            p.next(now, 8, Some(Duration::from_millis(3500)), last, 1.0),
            NextAttempt::NoTimeLeft,
            "inside the last second: no retry (it would be followed by ever closer ones)"
        );
        // Less than the guard left: no retry rather than a burst at the end.
        let close = now + Duration::from_millis(400);
        assert_eq!(
            p.next(now, 7, None, close, 1.0),
            NextAttempt::NoTimeLeft,
            "the guard leaves nothing"
        );
    }

    #[test]
    fn nan_jitter_counts_as_one() {
        let p = policy();
        let now = OffsetDateTime::UNIX_EPOCH;
        let far = now + Duration::from_secs(3600);
        assert_eq!(
            p.next(now, 3, None, far, f64::NAN),
            NextAttempt::At(now + Duration::from_secs(4))
        );
        assert_eq!(
            p.next(now, 3, None, far, -3.0),
            NextAttempt::At(now),
            "clamped"
        );
        assert_eq!(
            p.next(now, 3, None, far, 7.0),
            NextAttempt::At(now + Duration::from_secs(4)),
            "clamped"
        );
    }

    /// Property: over many policies, attempt counts, Graph waits, times left and jitter
    /// values, a retry is planned exactly when one fits, and it always fits: not before
    /// Graph's wait, before the last send time, and never later than the backoff allows.
    #[test]
    fn the_plan_fits_whenever_a_fit_exists() {
        let ms = Duration::from_millis;
        let policies = [
            policy(),
            RetryPolicy {
                base: ms(100),
                cap: Duration::from_secs(2),
            },
            RetryPolicy {
                base: Duration::from_secs(30),
                cap: Duration::from_secs(3600),
            },
            RetryPolicy {
                base: Duration::ZERO,
                cap: Duration::ZERO,
            },
        ];
        let waits = [
            None,
            Some(Duration::ZERO),
            Some(ms(1)),
            Some(ms(999)),
            Some(ms(1000)),
            Some(ms(1001)),
            Some(Duration::from_secs(60)),
            Some(Duration::from_secs(86_400)),
        ];
        let lefts_ms: [i64; 14] = [
            -5_000, -1, 0, 1, 2, 500, 999, 1_000, 1_001, 1_500, 4_000, 60_000, 3_600_000,
            90_000_000,
        ];
        let now = OffsetDateTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut rng = fastrand::Rng::with_seed(8);
        let mut planned = 0;
        for p in policies {
            for attempts in [0, 1, 2, 5, 12, 40, u32::MAX] {
                for at_least in waits {
                    for left_ms in lefts_ms {
                        let last_send = now + time::Duration::milliseconds(left_ms);
                        // The edges, and a random spread between them.
                        let jitters = [0.0, 1e-12, 0.5, 1.0 - 1e-12, 1.0]
                            .into_iter()
                            .chain((0..50).map(|_| rng.f64()));
                        for jitter in jitters {
                            let floor = at_least.unwrap_or(Duration::ZERO);
                            let fit_exists = now + floor + LAST_SEND_GUARD < last_send;
                            let got = p.next(now, attempts, at_least, last_send, jitter);
                            let case = format!(
                                "{p:?} attempts {attempts} at_least {at_least:?} left {left_ms} ms jitter {jitter}"
                            );
                            match got {
                                NextAttempt::At(at) => {
                                    planned += 1;
                                    assert!(fit_exists, "{case}: planned {at}");
                                    assert!(at >= now + floor, "{case}: {at} before the wait");
                                    assert!(
                                        at + LAST_SEND_GUARD <= last_send,
                                        "{case}: {at} inside the last guard before {last_send}"
                                    );
                                    let longest = p.ceiling(attempts).max(floor);
                                    assert!(at <= now + longest, "{case}: {at} beyond the backoff");
                                }
                                NextAttempt::NoTimeLeft => {
                                    assert!(!fit_exists, "{case}: a retry would fit")
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(planned > 10_000, "{planned}");
    }

    /// Property: with plenty of time left the plan is the plain full-jitter backoff, as
    /// before (the time left only matters near the deadline).
    #[test]
    fn far_from_the_deadline_nothing_changes() {
        let p = policy();
        let now = OffsetDateTime::UNIX_EPOCH;
        let far = now + Duration::from_secs(3600);
        for step in 0..=1000 {
            let jitter = f64::from(step) / 1000.0;
            for attempts in 1..10 {
                let expected = now + p.ceiling(attempts).mul_f64(jitter);
                assert_eq!(
                    p.next(now, attempts, None, far, jitter),
                    NextAttempt::At(expected),
                    "attempts {attempts} jitter {jitter}"
                );
            }
        }
    }
}
