//! When the dispatcher claims again.
//!
//! A claim costs the database about as much for 5 rows as for 100 (its work is per page).
//! Under a backlog of rate-limited pages a send finishes every few milliseconds, and claiming
//! after each one made claims run back to back (≈ 55 a second at 12 ms each), each finding
//! only the send slots that had opened since the one before (BENCHMARKS.md, "Claim sizing").
//! So after a claim that returned fewer rows than it asked for — every row due and every
//! slot open within the look-ahead is then claimed — a finished send waits for a short pace
//! before it claims: the claim it owes is made once the pace is over. New opt-ins and the
//! timer still claim at once, so a person's first message is never held back by the pace,
//! and slots are claimed a look-ahead before they open, so a pace well under the look-ahead
//! makes no send late.

use std::time::{Duration, Instant};

/// What woke the dispatcher's loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Woke {
    /// The loop's first round, or new due opt-ins were recorded.
    NewOptins,
    /// The timer (poll interval, or half the look-ahead while sends are in flight).
    Timer,
    /// A send finished, freeing a place.
    SendFinished,
    /// The pace after a short claim is over and a finished send owes a claim.
    PaceOver,
}

/// How the dispatcher's round of claims ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Filled {
    /// It did not claim: too few places were free (or it is shutting down, or the claim
    /// failed).
    NoClaim,
    /// The last claim returned every row it asked for: more may be due.
    Full,
    /// The last claim returned fewer rows than it asked for (or none): nothing more is due
    /// until time passes or opt-ins arrive.
    Short,
}

/// The claim cadence: whether a wake-up claims, and when a claim owed to a finished send
/// during a pace falls due.
#[derive(Debug)]
pub(super) struct Cadence {
    pace: Duration,
    /// Until when finished sends do not claim (set by a short claim).
    quiet_until: Option<Instant>,
    /// A send finished during the pace: claim when it is over.
    owed: bool,
}

impl Cadence {
    /// A cadence that waits `pace` after a short claim before a finished send claims again.
    pub(super) fn new(pace: Duration) -> Self {
        Self {
            pace,
            quiet_until: None,
            owed: false,
        }
    }

    /// Whether to claim now, woken by `woke` at `now`. A finished send within the pace owes
    /// a claim instead (see [`Cadence::owed_at`]).
    pub(super) fn claim_now(&mut self, woke: Woke, now: Instant) -> bool {
        if woke == Woke::SendFinished && self.quiet_until.is_some_and(|until| now < until) {
            self.owed = true;
            return false;
        }
        true
    }

    /// Records how a round of claims ended at `now`.
    pub(super) fn claimed(&mut self, filled: Filled, now: Instant) {
        self.owed = false;
        match filled {
            Filled::NoClaim => {}
            Filled::Full => self.quiet_until = None,
            Filled::Short => self.quiet_until = Some(now + self.pace),
        }
    }

    /// When the claim owed to a send that finished during the pace falls due; `None` when
    /// none is owed.
    pub(super) fn owed_at(&self) -> Option<Instant> {
        self.quiet_until.filter(|_| self.owed)
    }

    /// Completes when the claim owed to a finished send falls due; never when none is owed.
    pub(super) async fn owed_claim(&self) {
        match self.owed_at() {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACE: Duration = Duration::from_millis(30);

    #[test]
    fn finished_sends_claim_at_once_until_a_claim_comes_back_short() {
        let t0 = Instant::now();
        let mut c = Cadence::new(PACE);
        assert!(c.claim_now(Woke::SendFinished, t0));
        c.claimed(Filled::Full, t0);
        assert!(c.claim_now(Woke::SendFinished, t0), "more may be due");
        assert_eq!(c.owed_at(), None);
    }

    #[test]
    fn after_a_short_claim_finished_sends_owe_one_claim_at_the_end_of_the_pace() {
        let t0 = Instant::now();
        let mut c = Cadence::new(PACE);
        c.claimed(Filled::Short, t0);
        assert_eq!(c.owed_at(), None, "nothing owed before a send finishes");
        let t1 = t0 + Duration::from_millis(5);
        assert!(!c.claim_now(Woke::SendFinished, t1));
        assert!(!c.claim_now(Woke::SendFinished, t1));
        assert_eq!(
            c.owed_at(),
            Some(t0 + PACE),
            "one claim, when the pace is over"
        );
        assert!(c.claim_now(Woke::PaceOver, t0 + PACE));
        c.claimed(Filled::Short, t0 + PACE);
        assert_eq!(c.owed_at(), None, "the owed claim was made");
        assert!(
            c.claim_now(Woke::SendFinished, t0 + PACE * 2),
            "after the pace a finished send claims"
        );
    }

    #[test]
    fn new_opt_ins_and_the_timer_claim_during_the_pace() {
        let t0 = Instant::now();
        let mut c = Cadence::new(PACE);
        c.claimed(Filled::Short, t0);
        let t1 = t0 + Duration::from_millis(1);
        assert!(c.claim_now(Woke::NewOptins, t1));
        assert!(c.claim_now(Woke::Timer, t1));
    }

    #[test]
    fn a_round_without_a_claim_keeps_the_pace_and_clears_what_was_owed() {
        let t0 = Instant::now();
        let mut c = Cadence::new(PACE);
        c.claimed(Filled::Short, t0);
        assert!(!c.claim_now(Woke::SendFinished, t0));
        // The timer's round found too few places free: no claim, so the pace still runs,
        // and the next finished send owes the claim again.
        c.claimed(Filled::NoClaim, t0 + Duration::from_millis(2));
        assert_eq!(c.owed_at(), None);
        assert!(!c.claim_now(Woke::SendFinished, t0 + Duration::from_millis(3)));
        assert_eq!(c.owed_at(), Some(t0 + PACE));
    }
}
