//! The dispatcher: claims due opt-ins earliest deadline first and makes their Send API calls.
//!
//! It claims only as many rows as it has places for ([`CLAIMED_PER_CALL`] per call it may
//! have in flight: a claimed row waits for its slot without holding a call's place), and
//! each claimed row comes with its page's send slot (see `store::claim`): the call starts at
//! that slot, or not at all if it is more than [`SLOT_LATENESS`] late (the row goes back to
//! `pending`), so a page's limit holds across replicas in every one-second window.
//!
//! Right before each call the row is marked `call_started_at` (with the last checks, see
//! [`store::call_start::begin_call`]) and its lease is renewed to cover the call and its
//! commit; no call starts with less lease than that left. A lease that expires on a marked
//! row therefore means a worker died with a call possibly in flight, resolved by the
//! configured [`UnknownOutcome`] policy (see the README's "crash window" section); an unmarked
//! one simply goes back to `pending`. Slowness alone never makes a row look abandoned.
//!
//! What happens with Graph's answer (record, retry, end, pause, throttle, slow down) is in
//! `dispatch/answers.rs`; the claim itself in `dispatch/claims.rs`, when to claim again in
//! `dispatch/cadence.rs`, and the periodic sweeps in `dispatch/sweeps.rs`.

use lc_shared::optin::{FailureReason, OptinState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::graph::{GraphClient, SendOutcome};
use deadpool_postgres::Pool;
use lc_meta::pages::{OutgoingMessage, PageConfig, PagesConfig};
use lc_shared::shutdown::Shutdown;
use lc_shared::telemetry::{TraceParent, continue_trace, login_id_label};
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

mod answers;
mod cadence;
mod claims;
mod sweeps;

use cadence::{Cadence, Filled, Woke};

use super::group_commit::{ApplyBatch, GroupCommit};
use super::metrics::SchedulerMetrics;
use super::pacing::PageHolds;
use super::retry::RetryPolicy;
use super::store::call_start::CallCheck;
use super::store::claim::{Claimed, SLOT_LATENESS};

use super::store::finish::{Ending, Finish};
use super::store::rescue::UnknownOutcome;
use super::store::{self, Requeue, StoreError, StoredError, Timing};
use super::tokens::fingerprint;

/// A hook run after Graph accepted a message and before the result is recorded. Tests use it
/// to stop a worker inside the crash window; it is `None` in production.
pub type AfterSendHook =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// Settings of the dispatcher.
#[derive(Clone)]
pub struct DispatchSettings {
    /// Lease owner id of this replica.
    pub owner: String,
    /// How long a claim is valid; the call-start mark renews it for the call, so it must
    /// exceed the Graph timeout plus recording time.
    pub lease: Duration,
    /// Timeout of one Send API call: no call starts with less lease than this (plus the
    /// commit's guard) left.
    pub graph_timeout: Duration,
    /// How far ahead a page's send slots are claimed.
    pub lookahead: Duration,
    /// Most rows claimed per query.
    pub claim_batch: i64,
    /// Most Send API calls in flight.
    pub max_in_flight: usize,
    /// Poll interval for work that is not announced in-process.
    pub poll_interval: Duration,
    /// Deadline rules.
    pub timing: Timing,
    /// Backoff of retries.
    pub retry: RetryPolicy,
    /// Full jitter on retry delays (off only in tests).
    pub jitter: bool,
    /// Attempts after which an opt-in failing with unknown Graph codes gives up.
    pub max_unknown_attempts: i32,
    /// Attempts after which any opt-in gives up (a bound beyond the deadline rule).
    pub max_attempts: i32,
    /// What to do with claims whose lease expired.
    pub unknown_outcome: UnknownOutcome,
    /// Test hook inside the crash window.
    pub after_send: Option<AfterSendHook>,
}

/// Everything a send task needs.
pub struct Dispatcher {
    pool: Pool,
    graph: GraphClient,
    pages: Arc<RwLock<Arc<PagesConfig>>>,
    holds: Arc<PageHolds>,
    /// The last usage slow-down factor written per page (writes only on change).
    rate_factors: std::sync::Mutex<std::collections::HashMap<String, f64>>,
    /// Recent latency of a call-start mark (microseconds, smoothed): the mark is sent this
    /// much (twice over) ahead of the slot, so the call can start on time.
    mark_latency_us: std::sync::atomic::AtomicU64,
    /// Recent latency of a claim (microseconds, smoothed), for the slot offset.
    claim_latency_us: std::sync::atomic::AtomicU64,
    metrics: SchedulerMetrics,
    settings: DispatchSettings,
    /// Places for claimed rows, from the claim until the outcome is recorded.
    places: Arc<Semaphore>,
    /// Places for Send API calls in flight (`max_in_flight`), held only during the call.
    calls: Arc<Semaphore>,
    /// "Call started" marks, committed in groups.
    marks: GroupCommit<Claimed, CallCheck>,
    /// Terminal transitions (sent, failed, expired, replied) with their events, committed
    /// in groups.
    finishes: GroupCommit<Finish, bool>,
    /// Rows going back to `pending` (retries, give-backs), committed in groups.
    requeues: GroupCommit<Requeue, bool>,
}

/// Most writes in one group commit: enough to cover a claim batch's worth of sends finishing
/// together, small enough to keep each transaction short.
const GROUP_MAX: usize = 128;

/// Groups of one kind committed at once, each on its own connection. One at a time left the
/// database's other core idle while a group's statements ran and its commit waited for the
/// WAL flush, and capped a kind of write at one group per commit latency (≈ 1,000 ending
/// records/s on a loaded 2-core machine; BENCHMARKS.md).
const GROUP_PARALLEL: usize = 2;

/// Claimed rows per Send API call allowed in flight. A claimed row first waits for its page's
/// send slot (up to the look-ahead) and for its call-start mark; if it held a call's place
/// meanwhile, at 100 ms of Graph latency a row spent more time waiting than calling and the
/// calls in flight stayed well under `MAX_IN_FLIGHT_SENDS` (BENCHMARKS.md). So claimed rows
/// have their own, larger bound, and a call's place is taken only for the call itself.
const CLAIMED_PER_CALL: usize = 2;

/// After a short claim, finished sends wait this fraction of the look-ahead before they claim
/// again (31 ms at the default 250 ms): slots are claimed a look-ahead before they open, so
/// the pace makes no send late (see `dispatch/cadence.rs`).
const CLAIM_PACE_PER_LOOKAHEAD: u32 = 8;

impl Dispatcher {
    /// Builds a dispatcher.
    pub fn new(
        pool: Pool,
        graph: GraphClient,
        pages: Arc<RwLock<Arc<PagesConfig>>>,
        holds: Arc<PageHolds>,
        metrics: SchedulerMetrics,
        settings: DispatchSettings,
    ) -> Arc<Self> {
        let places = Arc::new(Semaphore::new(
            settings.max_in_flight.max(1) * CLAIMED_PER_CALL,
        ));
        let calls = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
        let marks = GroupCommit::start(
            "call-start marks",
            GROUP_MAX,
            GROUP_PARALLEL,
            with_client(&pool, |mut client, claims: Vec<Claimed>| async move {
                store::call_start::begin_calls(&mut client, &claims).await
            }),
        );
        let finishes = GroupCommit::start(
            "terminal transitions",
            GROUP_MAX,
            GROUP_PARALLEL,
            with_client(&pool, |mut client, finishes: Vec<Finish>| async move {
                store::finish::finish_group(&mut client, &finishes).await
            }),
        );
        let requeues = GroupCommit::start(
            "requeues",
            GROUP_MAX,
            GROUP_PARALLEL,
            with_client(&pool, |mut client, records: Vec<Requeue>| async move {
                store::requeue_group(&mut client, &records).await
            }),
        );
        Arc::new(Self {
            pool,
            graph,
            pages,
            holds,
            rate_factors: std::sync::Mutex::default(),
            mark_latency_us: std::sync::atomic::AtomicU64::new(5_000),
            claim_latency_us: std::sync::atomic::AtomicU64::new(5_000),
            metrics,
            settings,
            places,
            calls,
            marks,
            finishes,
            requeues,
        })
    }

    /// Runs until `shutdown`, then waits for in-flight calls to be recorded.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, shutdown: Shutdown) {
        let mut in_flight: JoinSet<()> = JoinSet::new();
        // A claim costs the database about as much for 5 rows as for 100 (its work is per
        // page), so the dispatcher claims only when a quarter of the places are free: with
        // fewer free, at least three quarters of the places hold claimed rows, which keep
        // the calls busy until the next quarter frees. A claim for every free place (on
        // each wake-up and timer tick) made claims of 20-25 rows at 100 ms of Graph latency
        // (BENCHMARKS.md, "Claim sizing"). Under a backlog a quarter frees after nearly every
        // finished send: the cadence (`dispatch/cadence.rs`) then paces the claims.
        let refill_at = (self.settings.max_in_flight * CLAIMED_PER_CALL / 4).max(1);
        let mut cadence = Cadence::new(self.settings.lookahead / CLAIM_PACE_PER_LOOKAHEAD);
        let mut woke = Woke::NewOptins;
        let mut last_rescue = Instant::now()
            .checked_sub(self.settings.poll_interval)
            .unwrap_or_else(Instant::now);
        while !shutdown.is_triggered() {
            // Reap every finished send, not one per wake-up: under a backlog completions
            // outrun the loop and finished tasks would pile up in the set.
            while in_flight.try_join_next().is_some() {}
            if last_rescue.elapsed() >= self.settings.poll_interval {
                last_rescue = Instant::now();
                self.rescue().await;
                self.expire_overdue().await;
            }
            if cadence.claim_now(woke, Instant::now()) {
                let filled = self
                    .fill(&mut in_flight, &shutdown, refill_at)
                    .await
                    .unwrap_or_else(|e| {
                        tracing::error!(error = %e, "claiming due opt-ins failed; retrying");
                        Filled::NoClaim
                    });
                cadence.claimed(filled, Instant::now());
            }
            // A wake-up (new opt-ins), a finished send (once the cadence's pace after a short
            // claim is over) or the timer claims again. While sends are in flight the timer runs every half look-ahead: a page with a backlog
            // then has its next slots claimed before the ones it holds run out, whatever the
            // Graph latency (completions come a call late).
            let tick = if in_flight.is_empty() {
                self.settings.poll_interval
            } else {
                self.settings.poll_interval.min(self.settings.lookahead / 2)
            };
            woke = tokio::select! {
                () = wake.notified() => Woke::NewOptins,
                () = tokio::time::sleep(tick) => Woke::Timer,
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => Woke::SendFinished,
                () = cadence.owed_claim() => Woke::PaceOver,
                () = shutdown.wait() => Woke::Timer,
            };
        }
        // Graceful: every call already started finishes and is recorded.
        while in_flight.join_next().await.is_some() {}
        tracing::info!("dispatcher stopped");
    }

    /// Puts a claimed row back to `pending` through the group commit. Returns false if the
    /// claim was no longer ours.
    pub(super) async fn requeue(&self, record: Requeue) -> Result<bool, StoreError> {
        self.requeues.submit(record).await
    }

    /// One claimed opt-in: checks, the call, and recording its outcome. Database errors are
    /// retried a few times; if recording keeps failing, the lease expires and the rescuer
    /// applies the unknown-outcome policy.
    async fn process(&self, c: Claimed, shutdown: Shutdown) {
        let span = tracing::info_span!(
            "first_message",
            page_id = %c.page_id,
            login_id = %login_id_label(&c.login_id),
            trace_id = tracing::field::Empty,
            attempt = c.attempts + 1,
        );
        let parent = c.traceparent.as_deref().and_then(TraceParent::parse);
        let trace = continue_trace(&span, parent.as_ref());
        span.record("trace_id", trace.trace_id_hex());
        async {
            if let Err(e) = self.process_inner(&c, &shutdown, &trace).await {
                tracing::error!(error = %e, "could not record the outcome; the lease will expire and be rescued");
            }
        }
        .instrument(span)
        .await;
    }

    async fn process_inner(
        &self,
        c: &Claimed,
        shutdown: &Shutdown,
        trace: &TraceParent,
    ) -> Result<(), StoreError> {
        let last_send = self.settings.timing.last_send(c.deadline);
        if OffsetDateTime::now_utc() >= last_send {
            return self.end(c, Ending::Expired, false, None).await;
        }
        let page = self.pages.read().await.get(&c.page_id).cloned();
        let Some(page) = page else {
            tracing::error!("page is no longer in PAGES_FILE; failing the opt-in");
            return self
                .end(c, Ending::Failed(FailureReason::UnknownPage), false, None)
                .await;
        };
        // The mark goes out ahead of the slot by twice its recent latency, so the call can
        // start on its slot; waiting for the slot itself comes after the mark.
        let lead = Duration::from_micros(
            2 * self
                .mark_latency_us
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .min(Duration::from_millis(500));
        let mark_at = c.slot.checked_sub(lead).unwrap_or(c.slot);
        tokio::select! {
            () = tokio::time::sleep_until(mark_at.into()) => {}
            () = shutdown.wait() => return self.give_back(c, "shutting down").await,
        }
        if let Some(blocked) = self.holds.blocked(&c.page_id) {
            return self.give_back(c, blocked.describe()).await;
        }
        if OffsetDateTime::now_utc() >= last_send {
            return self.end(c, Ending::Expired, false, None).await;
        }
        let Some(lease_end) = self.begin_call(c).await? else {
            return Ok(());
        };
        // From here on the renewed lease is the one that counts.
        let c = &Claimed {
            lease_end,
            ..c.clone()
        };
        tokio::time::sleep_until(c.slot.into()).await;
        // The call's place; waiting for one counts against the slot's lateness like any wait.
        let Ok(call_place) = self.calls.acquire().await else {
            return self.give_back(c, "the dispatcher is closing").await;
        };
        let now = Instant::now();
        if now > c.slot + SLOT_LATENESS {
            // Calling now could crowd the page's next slots: give the row back instead.
            self.metrics.slots_missed.inc();
            return self
                .give_back(c, "its send slot passed while waiting")
                .await;
        }
        // Enough lease for the whole call and its commit, or no call: a slow call must
        // never be mistaken for a dead worker's (the rescuer acts only after the lease).
        let guard = LEASE_END_GUARD.min(c.lease.saturating_sub(self.settings.graph_timeout) / 2);
        if now + self.settings.graph_timeout + guard >= c.lease_end {
            return self
                .give_back(c, "too little lease left to cover the call")
                .await;
        }
        // The mark may have waited for its group (or a database hiccup): the deadline rule
        // and the holds are checked once more against the moment the call really starts.
        if OffsetDateTime::now_utc() >= last_send {
            return self.end(c, Ending::Expired, false, None).await;
        }
        if let Some(blocked) = self.holds.blocked(&c.page_id) {
            return self.give_back(c, blocked.describe()).await;
        }

        // The configuration as of now (a new token may have arrived while waiting).
        let page = self
            .pages
            .read()
            .await
            .get(&c.page_id)
            .cloned()
            .unwrap_or(page);
        let message = self.render(&page, c);
        // The call gets its own span, so the trace shows Graph's latency apart from ours.
        let call_span = tracing::info_span!("send_api_call", page_id = %c.page_id);
        let call_trace = continue_trace(&call_span, Some(trace)).to_string();
        let started = Instant::now();
        let outcome = self
            .graph
            .send_message(&page, &message, &c.login_id, Some(&call_trace))
            .instrument(call_span)
            .await;
        drop(call_place);
        self.metrics
            .send_latency
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            SendOutcome::Sent {
                message_id, usage, ..
            } => {
                if let Some(usage) = usage {
                    self.apply_usage(&c.page_id, &usage).await;
                }
                if let Some(hook) = &self.settings.after_send {
                    hook().await;
                }
                self.record_sent(c, &message_id).await
            }
            SendOutcome::Failed(f) => {
                if let Some(usage) = &f.usage {
                    self.apply_usage(&c.page_id, usage).await;
                }
                // A pause names the token the call was made with, not whatever is configured
                // by the time the answer came (a replica may have reloaded meanwhile).
                let token = fingerprint(page.access_token.expose());
                self.record_failure(c, f, last_send, &token).await
            }
        }
    }

    /// The message for this opt-in: the variant its `ref` chooses, filled with its variables,
    /// or the page's own message. A rendering that fails or breaks Meta's limits is never
    /// sent: the variant's default text goes instead, logged and counted by reason.
    fn render(&self, page: &PageConfig, c: &Claimed) -> OutgoingMessage {
        let rendered = page
            .first_message
            .render(c.message_ref.as_deref(), &c.variables);
        if let Some(reason) = rendered.fallback {
            self.metrics
                .message_fallbacks
                .with_label_values(&[reason.as_str()])
                .inc();
            tracing::warn!(
                page_id = %c.page_id,
                variant = rendered.variant.unwrap_or_default(),
                reason = reason.as_str(),
                "personalised first message not usable; sending the variant's default text"
            );
        }
        rendered.message
    }

    /// Gives a claimed row back without a call (it is due again at once; a held page's rows
    /// are not claimed until the hold ends). A call-start mark, if made, is cleared with it.
    async fn give_back(&self, c: &Claimed, why: &str) -> Result<(), StoreError> {
        tracing::debug!(why, "giving the claim back without a call");
        self.requeue(Requeue::Release {
            claim: c.clone(),
            at: OffsetDateTime::now_utc(),
        })
        .await?;
        Ok(())
    }

    /// The checks right before the call and the row's "call started" mark, which renews its
    /// lease (see [`store::call_start::begin_call`]). Returns the renewed lease's end (on
    /// this process's clock) when the call may go ahead; every other outcome is recorded here.
    async fn begin_call(&self, c: &Claimed) -> Result<Option<Instant>, StoreError> {
        let submitted = Instant::now();
        let check = self.marks.submit(c.clone()).await?;
        smooth(&self.mark_latency_us, submitted.elapsed());
        match check {
            // The renewal was written after `submitted`, so the database's lease ends later.
            CallCheck::Go => Ok(Some(submitted + c.lease)),
            CallCheck::Replied(at) => {
                tracing::info!("the person already replied; no first message needed");
                let finish = Finish::Replied {
                    claim: c.clone(),
                    replied_at: at,
                };
                if self.finishes.submit(finish).await? {
                    self.metrics.terminal_of(OptinState::Replied).inc();
                }
                Ok(None)
            }
            CallCheck::OtherPage(other) => {
                let err = StoredError {
                    message: format!(
                        "this login_id was already messaged through page {other}; Meta allows only that page to use it"
                    ),
                    ..StoredError::default()
                };
                tracing::error!(other_page = %other, "refusing to message a login_id through a second page");
                self.end(
                    c,
                    Ending::Failed(FailureReason::OtherPage),
                    false,
                    Some(&err),
                )
                .await?;
                Ok(None)
            }
            CallCheck::Lost => {
                self.metrics.fenced_out.inc();
                tracing::warn!("the claim was taken over before the call; not calling");
                Ok(None)
            }
        }
    }
}

/// Runs a write for claim `c` until it succeeds or the claim's lease is about to run out.
/// After a call, a write given up means the rescuer will find the lease expired and the
/// outcome unknown, so a database outage is waited out as long as the lease allows (the
/// fence still refuses the write if another replica has taken the row over meanwhile).
async fn until_lease_end<T, Fut>(
    c: &Claimed,
    mut write: impl FnMut() -> Fut,
) -> Result<T, StoreError>
where
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match write().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() + delay + LEASE_END_GUARD >= c.lease_end => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "writing the outcome failed; retrying while the lease lasts");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Folds one measured latency into a smoothed one (an exponential moving average, 1/8 weight).
fn smooth(average_us: &std::sync::atomic::AtomicU64, took: Duration) {
    let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    let old = average_us.load(std::sync::atomic::Ordering::Relaxed);
    average_us.store(
        old.saturating_mul(7).saturating_add(took) / 8,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// Room left before the lease ends for a last write to land before the rescuer may act.
const LEASE_END_GUARD: Duration = Duration::from_millis(500);

/// A group-commit function that takes a connection from `pool` for each group.
fn with_client<Req, Resp, F, Fut>(pool: &Pool, apply: F) -> ApplyBatch<Req, Resp>
where
    Req: Send + 'static,
    F: Fn(deadpool_postgres::Object, Vec<Req>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Vec<Resp>, StoreError>> + Send + 'static,
{
    let (pool, apply) = (pool.clone(), Arc::new(apply));
    Arc::new(move |reqs: Vec<Req>| {
        let (pool, apply) = (pool.clone(), apply.clone());
        Box::pin(async move {
            let client = pool.get().await?;
            apply(client, reqs).await
        })
    })
}
