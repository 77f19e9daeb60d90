//! The dispatcher: claims due opt-ins earliest deadline first and makes their Send API calls.
//!
//! It claims only as many rows as it can start calls for at once (free concurrency slots).
//! Right before each call the row is marked `call_started_at` (with the last checks, see
//! [`store::call_start::begin_call`]): a lease that expires on a marked row means a worker died with a
//! call possibly in flight, resolved by the configured [`UnknownOutcome`] policy (see the
//! README's "crash window" section); an unmarked one simply goes back to `pending`.

use lc_shared::optin::{FailureReason, OptinState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::graph::{FailureClass, GraphClient, GraphFailure, PAGE_RESTRICTED_RECHECK, SendOutcome};
use deadpool_postgres::Pool;
use lc_meta::pages::PagesConfig;
use lc_shared::shutdown::Shutdown;
use lc_shared::telemetry::{TraceParent, continue_trace, login_id_label};
use time::OffsetDateTime;
use tokio::sync::{Notify, RwLock, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::group_commit::{ApplyBatch, GroupCommit};
use super::metrics::SchedulerMetrics;
use super::pacing::{PagePauses, PageRateLimiter, PauseReason};
use super::retry::{NextAttempt, RetryPolicy};
use super::store::call_start::CallCheck;
use super::store::rescue::UnknownOutcome;
use super::store::{self, Claimed, Ending, SentRecord, StoreError, StoredError, Timing};

/// A hook run after Graph accepted a message and before the result is recorded. Tests use it
/// to stop a worker inside the crash window; it is `None` in production.
pub type AfterSendHook =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// Settings of the dispatcher.
#[derive(Clone)]
pub struct DispatchSettings {
    /// Lease owner id of this replica.
    pub owner: String,
    /// How long a claim is valid; must exceed the Graph timeout plus recording time.
    pub lease: Duration,
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
    limiter: PageRateLimiter,
    pauses: Arc<PagePauses>,
    metrics: SchedulerMetrics,
    settings: DispatchSettings,
    slots: Arc<Semaphore>,
    /// "Call started" marks, committed in groups.
    marks: GroupCommit<Claimed, CallCheck>,
    /// "Sent" records, committed in groups.
    sent: GroupCommit<SentRecord, bool>,
}

/// Most writes in one group commit: enough to cover a claim batch's worth of sends finishing
/// together, small enough to keep each transaction short.
const GROUP_MAX: usize = 128;

impl Dispatcher {
    /// Builds a dispatcher.
    pub fn new(
        pool: Pool,
        graph: GraphClient,
        pages: Arc<RwLock<Arc<PagesConfig>>>,
        page_rate: u32,
        pauses: Arc<PagePauses>,
        metrics: SchedulerMetrics,
        settings: DispatchSettings,
    ) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(settings.max_in_flight.max(1)));
        let marks = GroupCommit::start(
            "call-start marks",
            GROUP_MAX,
            with_client(&pool, |mut client, claims: Vec<Claimed>| async move {
                store::call_start::begin_calls(&mut client, &claims).await
            }),
        );
        let sent = GroupCommit::start(
            "sent records",
            GROUP_MAX,
            with_client(&pool, |mut client, records: Vec<SentRecord>| async move {
                store::finish_sent_group(&mut client, &records).await
            }),
        );
        Arc::new(Self {
            pool,
            graph,
            pages,
            limiter: PageRateLimiter::new(page_rate),
            pauses,
            metrics,
            settings,
            slots,
            marks,
            sent,
        })
    }

    /// Runs until `shutdown`, then waits for in-flight calls to be recorded.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, shutdown: Shutdown) {
        let mut in_flight: JoinSet<()> = JoinSet::new();
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
            if let Err(e) = self.fill(&mut in_flight, &shutdown).await {
                tracing::error!(error = %e, "claiming due opt-ins failed; retrying");
            }
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll_interval) => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                () = shutdown.wait() => {}
            }
        }
        // Graceful: every call already started finishes and is recorded.
        while in_flight.join_next().await.is_some() {}
        tracing::info!("dispatcher stopped");
    }

    /// Claims and starts calls while there are free slots and due rows.
    async fn fill(
        self: &Arc<Self>,
        in_flight: &mut JoinSet<()>,
        shutdown: &Shutdown,
    ) -> Result<(), StoreError> {
        loop {
            let free = self.slots.available_permits();
            if free == 0 || shutdown.is_triggered() {
                return Ok(());
            }
            let limit = i64::try_from(free)
                .unwrap_or(i64::MAX)
                .min(self.settings.claim_batch);
            let client = self.pool.get().await?;
            let claimed = store::claim_due(
                &client,
                &self.settings.owner,
                self.settings.lease,
                limit,
                &self.pauses.paused_pages(),
                self.settings.timing.safety_margin,
            )
            .await?;
            drop(client);
            if claimed.is_empty() {
                return Ok(());
            }
            let full = i64::try_from(claimed.len()).unwrap_or(0) == limit;
            for c in claimed {
                let Ok(permit) = self.slots.clone().try_acquire_owned() else {
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
                return Ok(());
            }
        }
    }

    async fn rescue(&self) {
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot rescue expired leases");
                return;
            }
        };
        match store::rescue::rescue_expired_leases(&mut client, self.settings.unknown_outcome, 500)
            .await
        {
            Ok(r) => {
                self.metrics
                    .leases_rescued
                    .inc_by((r.returned + r.unknown) as u64);
                if self.settings.unknown_outcome == UnknownOutcome::Fail {
                    self.metrics
                        .terminal_of(OptinState::Failed)
                        .inc_by(r.unknown as u64);
                }
            }
            Err(e) => tracing::error!(error = %e, "rescuing expired leases failed"),
        }
    }

    /// Expires pending opt-ins that can no longer be sent, in bulk, so that under overload
    /// no send slot is spent on a row that is already dead.
    async fn expire_overdue(&self) {
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot expire overdue opt-ins");
                return;
            }
        };
        loop {
            match store::expire_overdue(&mut client, self.settings.timing.safety_margin, 1000).await
            {
                Ok(0) => return,
                Ok(n) => {
                    self.metrics
                        .terminal_of(OptinState::Expired)
                        .inc_by(n as u64);
                    tracing::warn!(
                        expired = n,
                        "opt-ins expired before they could be sent (backlog beyond capacity?)"
                    );
                    if n < 1000 {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "expiring overdue opt-ins failed");
                    return;
                }
            }
        }
    }

    async fn release_quietly(&self, c: &Claimed) {
        if let Ok(client) = self.pool.get().await {
            let _ = store::release(&client, c, OffsetDateTime::now_utc()).await;
        }
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
        if self.pauses.paused(&c.page_id).is_some() {
            let client = self.pool.get().await?;
            store::release(&client, c, OffsetDateTime::now_utc()).await?;
            return Ok(());
        }
        let slot = self.limiter.reserve(&c.page_id);
        tokio::select! {
            () = tokio::time::sleep_until(slot) => {}
            () = shutdown.wait() => {
                let client = self.pool.get().await?;
                store::release(&client, c, OffsetDateTime::now_utc()).await?;
                return Ok(());
            }
        }
        if OffsetDateTime::now_utc() >= last_send {
            return self.end(c, Ending::Expired, false, None).await;
        }
        if !self.begin_call(c).await? {
            return Ok(());
        }
        // The mark may have waited for its group (or a database hiccup): the deadline rule
        // is checked once more against the moment the call would really start.
        if OffsetDateTime::now_utc() >= last_send {
            return self.end(c, Ending::Expired, false, None).await;
        }

        // The call gets its own span, so the trace shows Graph's latency apart from ours.
        let call_span = tracing::info_span!("send_api_call", page_id = %c.page_id);
        let call_trace = continue_trace(&call_span, Some(trace)).to_string();
        let started = Instant::now();
        let outcome = self
            .graph
            .send_first_message(&page, &c.login_id, Some(&call_trace))
            .instrument(call_span)
            .await;
        self.metrics
            .send_latency
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            SendOutcome::Sent { message_id, .. } => {
                if let Some(hook) = &self.settings.after_send {
                    hook().await;
                }
                self.record_sent(c, &message_id).await
            }
            SendOutcome::Failed(f) => self.record_failure(c, f, last_send).await,
        }
    }

    /// The checks right before the call and the row's "call started" mark (see
    /// [`store::call_start::begin_call`]). Returns whether to call; every other outcome is recorded here.
    async fn begin_call(&self, c: &Claimed) -> Result<bool, StoreError> {
        match self.marks.submit(c.clone()).await? {
            CallCheck::Go => Ok(true),
            CallCheck::Replied(at) => {
                tracing::info!("the person already replied; no first message needed");
                let client = self.pool.get().await?;
                if store::finish_replied(&client, c, at).await? {
                    self.metrics.terminal_of(OptinState::Replied).inc();
                }
                Ok(false)
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
                Ok(false)
            }
            CallCheck::Lost => {
                self.metrics.fenced_out.inc();
                tracing::warn!("the claim was taken over before the call; not calling");
                Ok(false)
            }
        }
    }

    async fn record_sent(&self, c: &Claimed, message_id: &str) -> Result<(), StoreError> {
        self.metrics.sends.with_label_values(&["sent"]).inc();
        let sent_at = OffsetDateTime::now_utc();
        // The crash window: Graph has sent the message; only this commit records it.
        let record = SentRecord {
            claim: c.clone(),
            message_id: message_id.to_owned(),
            sent_at,
        };
        let written = until_lease_end(c, || self.sent.submit(record.clone())).await?;
        if written {
            self.metrics.terminal_of(OptinState::Sent).inc();
            self.metrics
                .optin_to_send
                .observe((sent_at - c.opted_in_at).as_seconds_f64().max(0.0));
            self.metrics
                .deadline_slack
                .observe((c.deadline - sent_at).as_seconds_f64().max(0.0));
            tracing::info!(message_id, "first message sent");
        } else {
            self.metrics.fenced_out.inc();
            tracing::error!(
                message_id,
                "first message sent, but the claim was taken over meanwhile; the newer claim's outcome stands"
            );
        }
        Ok(())
    }

    async fn record_failure(
        &self,
        c: &Claimed,
        f: GraphFailure,
        last_send: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.metrics
            .sends
            .with_label_values(&[f.class.as_str()])
            .inc();
        let code = f
            .code
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into());
        let subcode = f
            .subcode
            .map(|c| c.to_string())
            .unwrap_or_else(|| "none".into());
        self.metrics
            .graph_errors
            .with_label_values(&[code.as_str(), subcode.as_str()])
            .inc();
        let err = StoredError {
            code: f.code,
            subcode: f.subcode,
            message: f.message.clone(),
            fbtrace_id: f.fbtrace_id.clone(),
        };
        let attempts_after = c.attempts + 1;
        let retryable = match f.class {
            FailureClass::Permanent => {
                tracing::warn!(error = %f, "permanent Send API error; not retrying");
                return self
                    .end(
                        c,
                        Ending::Failed(FailureReason::GraphPermanent),
                        true,
                        Some(&err),
                    )
                    .await;
            }
            FailureClass::TokenInvalid => {
                self.pauses.stop_for_token(&c.page_id);
                self.metrics
                    .paused_pages
                    .with_label_values(&[c.page_id.as_str()])
                    .set(1);
                tracing::error!(error = %f, "page token invalid: pausing this page's sends until its token changes (fix PAGES_FILE / the token variable, then SIGHUP or restart)");
                let now = OffsetDateTime::now_utc();
                until_lease_end(c, || async {
                    let client = self.pool.get().await?;
                    store::reschedule(&client, c, now, &err).await
                })
                .await?;
                return Ok(());
            }
            FailureClass::PageRestricted => {
                // Meta restricted the page's sending for a while: every opt-in of the page
                // would fail alike, so hold the page and keep the opt-in, as for a token.
                let pause = f.retry_after.unwrap_or(PAGE_RESTRICTED_RECHECK);
                self.pauses.throttle(&c.page_id, pause);
                tracing::error!(error = %f, pause_secs = pause.as_secs(), "page temporarily restricted from sending by Meta: pausing its sends (check the Page's status in Meta Business Suite)");
                let now = OffsetDateTime::now_utc();
                until_lease_end(c, || async {
                    let client = self.pool.get().await?;
                    store::reschedule(&client, c, now, &err).await
                })
                .await?;
                return Ok(());
            }
            // App-wide throttling: only this page for now (all pages: to be wired in pacing).
            FailureClass::RateLimited | FailureClass::AppThrottled => {
                // Without Graph's own estimate, pause the page for the backoff ceiling.
                let pause = f.retry_after.unwrap_or_else(|| {
                    self.settings
                        .retry
                        .ceiling(u32::try_from(attempts_after).unwrap_or(u32::MAX))
                });
                self.pauses.throttle(&c.page_id, pause);
                tracing::warn!(error = %f, pause_secs = pause.as_secs(), "page rate-limited by Graph; throttling it");
                true
            }
            FailureClass::OutcomeUnknown
                if self.settings.unknown_outcome == UnknownOutcome::Fail =>
            {
                tracing::warn!(error = %f, "Send API outcome unknown (the message may have been sent); not retrying (UNKNOWN_OUTCOME=fail)");
                return self
                    .end(
                        c,
                        Ending::Failed(FailureReason::OutcomeUnknown),
                        true,
                        Some(&err),
                    )
                    .await;
            }
            FailureClass::OutcomeUnknown => true,
            FailureClass::Unknown => attempts_after < self.settings.max_unknown_attempts,
            FailureClass::TransientOnce => f
                .class
                .attempt_limit()
                .is_none_or(|limit| i64::from(attempts_after) < i64::from(limit)),
            FailureClass::Transient => true,
        };
        if !retryable || attempts_after >= self.settings.max_attempts {
            tracing::warn!(error = %f, attempts = attempts_after, "giving up after repeated failures");
            return self
                .end(
                    c,
                    Ending::Failed(FailureReason::RetriesExhausted),
                    true,
                    Some(&err),
                )
                .await;
        }
        let now = OffsetDateTime::now_utc();
        let attempts = u32::try_from(attempts_after).unwrap_or(u32::MAX);
        let jitter = if self.settings.jitter {
            fastrand::f64()
        } else {
            1.0
        };
        match self
            .settings
            .retry
            .next(now, attempts, f.retry_after, last_send, jitter)
        {
            NextAttempt::At(at) => {
                self.metrics.retries.inc();
                tracing::info!(error = %f, retry_in_ms = (at - now).whole_milliseconds(), "transient Send API error; retrying");
                let rescheduled = until_lease_end(c, || async {
                    let client = self.pool.get().await?;
                    store::reschedule(&client, c, at, &err).await
                })
                .await?;
                if !rescheduled {
                    self.metrics.fenced_out.inc();
                }
                Ok(())
            }
            NextAttempt::NoTimeLeft => {
                tracing::warn!(error = %f, "no retry fits before the deadline; expiring");
                self.end(c, Ending::Expired, true, Some(&err)).await
            }
        }
    }

    async fn end(
        &self,
        c: &Claimed,
        ending: Ending,
        called: bool,
        err: Option<&StoredError>,
    ) -> Result<(), StoreError> {
        let state = match ending {
            Ending::Failed(_) => OptinState::Failed,
            Ending::Expired => OptinState::Expired,
        };
        let finished = until_lease_end(c, || async {
            let mut client = self.pool.get().await?;
            store::finish_unsent(&mut client, c, ending.clone(), called, err).await
        })
        .await?;
        if finished {
            self.metrics.terminal_of(state).inc();
        } else {
            self.metrics.fenced_out.inc();
        }
        Ok(())
    }

    /// True if `page_id` is paused for an invalid token.
    pub fn token_paused(&self, page_id: &str) -> bool {
        self.pauses.paused(page_id) == Some(PauseReason::TokenInvalid)
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
