//! Claiming: how many due rows the dispatcher claims and where each one's call is started.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lc_shared::shutdown::Shutdown;
use time::OffsetDateTime;
use tokio::task::JoinSet;

use super::cadence::Filled;
use super::{Dispatcher, smooth};
use crate::scheduler::store::claim::{ClaimRequest, Claimed};
use crate::scheduler::store::{self, Requeue, StoreError};

impl Dispatcher {
    /// Claims and starts calls while at least `min_free` places are free and due rows are
    /// left; says how the last claim ended.
    pub(super) async fn fill(
        self: &Arc<Self>,
        in_flight: &mut JoinSet<()>,
        shutdown: &Shutdown,
        min_free: usize,
    ) -> Result<Filled, StoreError> {
        let mut filled = Filled::NoClaim;
        loop {
            let free = self.places.available_permits();
            if free == 0 || free < min_free || shutdown.is_triggered() {
                return Ok(filled);
            }
            let limit = i64::try_from(free)
                .unwrap_or(i64::MAX)
                .min(self.settings.claim_batch);
            let mut client = self.pool.get().await?;
            let request = ClaimRequest {
                safety_margin: self.settings.timing.safety_margin,
                lookahead: self.settings.lookahead,
                slot_offset: self.slot_offset(),
                ..ClaimRequest::new(&self.settings.owner, self.settings.lease, limit)
            };
            let claim_started = Instant::now();
            let claimed = store::claim::claim_due(&mut client, &request).await?;
            let took = claim_started.elapsed();
            smooth(&self.claim_latency_us, took);
            self.metrics.claim_duration.observe(took.as_secs_f64());
            self.metrics.claim_rows.observe(claimed.len() as f64);
            drop(client);
            if claimed.is_empty() {
                return Ok(Filled::Short);
            }
            let full = i64::try_from(claimed.len()).unwrap_or(0) == limit;
            filled = if full { Filled::Full } else { Filled::Short };
            for c in claimed {
                let Ok(permit) = self.places.clone().try_acquire_owned() else {
                    // Cannot happen (we claimed at most `free`); give the row back if it does.
                    self.release_quietly(&c).await;
                    continue;
                };
                let me = self.clone();
                let stop = shutdown.clone();
                in_flight.spawn(async move {
                    me.process(c, stop).await;
                    drop(permit);
                });
            }
            if !full {
                return Ok(filled);
            }
        }
    }

    async fn release_quietly(&self, c: &Claimed) {
        let _ = self
            .requeue(Requeue::Release {
                claim: c.clone(),
                at: OffsetDateTime::now_utc(),
            })
            .await;
    }

    /// How far after now an idle page's first slot is put: what this replica needs from a
    /// claim to its calls (the whole claim, though only its commit follows the slot's
    /// reckoning, and the call-start mark twice over), so that a slot has not passed by the
    /// time its call could start. Not doubled again: that put an idle page's first message
    /// ≈ 60 ms later than needed at the design load (webhook → Graph p50 125 ms, p99 407 ms
    /// in `bench procs`; 76 and 138 ms without), while the slots it saved were within
    /// [`SLOT_LATENESS`] anyway (missed slots fell from 47 to 26 of 5,000). Bounded: a
    /// database that slow needs a longer look-ahead, not a late first message.
    ///
    /// [`SLOT_LATENESS`]: crate::scheduler::store::claim::SLOT_LATENESS
    fn slot_offset(&self) -> Duration {
        let us = self
            .claim_latency_us
            .load(std::sync::atomic::Ordering::Relaxed)
            + 2 * self
                .mark_latency_us
                .load(std::sync::atomic::Ordering::Relaxed);
        (Duration::from_micros(us) + Duration::from_millis(5)).min(self.settings.lookahead / 2)
    }
}
