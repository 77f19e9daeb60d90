//! What the dispatcher does with Graph's answer: record a send, plan a retry, end an opt-in,
//! or hold its page (pause, throttle, slow down) for every replica.

use std::time::Duration;

use lc_shared::optin::{FailureReason, OptinState};
use time::OffsetDateTime;

use super::{Dispatcher, until_lease_end};
use crate::graph::{FailureClass, GraphFailure};
use crate::scheduler::retry::NextAttempt;
use crate::scheduler::store::claim::Claimed;
use crate::scheduler::store::finish::{Ending, Finish, SentRecord};
use crate::scheduler::store::pages::{self, PauseReason};
use crate::scheduler::store::rescue::UnknownOutcome;
use crate::scheduler::store::{Requeue, StoreError, StoredError};
use crate::scheduler::tokens::fingerprint;

impl Dispatcher {
    pub(super) async fn record_sent(
        &self,
        c: &Claimed,
        message_id: &str,
    ) -> Result<(), StoreError> {
        self.metrics.sends.with_label_values(&["sent"]).inc();
        let sent_at = OffsetDateTime::now_utc();
        // The crash window: Graph has sent the message; only this commit records it.
        let record = SentRecord {
            claim: c.clone(),
            message_id: message_id.to_owned(),
            sent_at,
        };
        let written =
            until_lease_end(c, || self.finishes.submit(Finish::Sent(record.clone()))).await?;
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

    pub(super) async fn record_failure(
        &self,
        c: &Claimed,
        f: GraphFailure,
        last_send: OffsetDateTime,
        token_fingerprint: &str,
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
                // A refusal of a token this replica no longer holds (a new one arrived while
                // the call was in flight) says nothing about the new one: no pause.
                let current = self
                    .pages
                    .read()
                    .await
                    .get(&c.page_id)
                    .map(|p| fingerprint(p.access_token.expose()));
                if current.as_deref().is_some_and(|t| t != token_fingerprint) {
                    tracing::warn!(error = %f, "an old token of the page was refused; the new one is in use, not pausing");
                    let now = OffsetDateTime::now_utc();
                    until_lease_end(c, || {
                        self.requeue(Requeue::Retry {
                            claim: c.clone(),
                            at: now,
                            error: err.clone(),
                        })
                    })
                    .await?;
                    return Ok(());
                }
                tracing::error!(error = %f, "page token invalid: pausing this page's sends on every replica until its token changes (a new token in PAGES_FILE, or `loginconnect pages set-token`)");
                return self
                    .pause_and_keep(
                        c,
                        PauseReason::TokenInvalid,
                        Some(token_fingerprint),
                        &f,
                        &err,
                    )
                    .await;
            }
            FailureClass::PageRestricted => {
                // Meta restricted the page's sending: every opt-in of the page would fail
                // alike, so pause the page on every replica and keep the opt-in, as for a
                // token, until an operator who checked the Page resumes it.
                tracing::error!(error = %f, "page restricted from sending by Meta: its sends are paused on every replica (check the Page in Meta Business Suite, then `loginconnect pages resume`)");
                return self
                    .pause_and_keep(c, PauseReason::Restricted, None, &f, &err)
                    .await;
            }
            FailureClass::RateLimited | FailureClass::AppThrottled => {
                // Without Graph's own estimate, hold for the backoff ceiling.
                let pause = f.retry_after.unwrap_or_else(|| {
                    self.settings
                        .retry
                        .ceiling(u32::try_from(attempts_after).unwrap_or(u32::MAX))
                });
                let app_wide = f.class == FailureClass::AppThrottled;
                self.throttle(&c.page_id, app_wide, pause).await;
                tracing::warn!(error = %f, pause_secs = pause.as_secs(), app_wide, "rate-limited by Graph; throttling");
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
                let rescheduled = until_lease_end(c, || {
                    self.requeue(Requeue::Retry {
                        claim: c.clone(),
                        at,
                        error: err.clone(),
                    })
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

    pub(super) async fn end(
        &self,
        c: &Claimed,
        ending: Ending,
        called: bool,
        err: Option<&StoredError>,
    ) -> Result<(), StoreError> {
        let finish = Finish::Unsent {
            claim: c.clone(),
            ending,
            called,
            error: err.cloned(),
        };
        let state = finish.state();
        let finished = until_lease_end(c, || self.finishes.submit(finish.clone())).await?;
        if finished {
            self.metrics.terminal_of(state).inc();
        } else {
            self.metrics.fenced_out.inc();
        }
        Ok(())
    }

    /// Throttles the page (or, `app_wide`, every page) here at once and for every replica.
    pub(super) async fn throttle(&self, page_id: &str, app_wide: bool, pause: Duration) {
        if app_wide {
            self.holds.note_app_throttle(pause);
        } else {
            self.holds.note_throttle(page_id, pause);
        }
        let written = match self.pool.get().await {
            Ok(client) if app_wide => pages::throttle_app(&client, pause).await,
            Ok(mut client) => pages::throttle(&mut client, page_id, pause).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the throttle for the other replicas");
        }
    }

    /// Slows the page down as Graph's usage headers near 100 % (and holds it while Graph
    /// says access must be regained). Written to the shared state only when the factor moves
    /// by more than a twentieth, so steady usage costs nothing.
    pub(super) async fn apply_usage(&self, page_id: &str, usage: &crate::graph::usage::Usage) {
        let factor = usage.rate_factor();
        if factor <= 0.0 {
            let pause = usage.regain_after.unwrap_or(self.settings.retry.cap);
            self.throttle(page_id, false, pause).await;
            return;
        }
        let changed = {
            let mut last = self
                .rate_factors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let before = last.insert(page_id.to_owned(), factor).unwrap_or(1.0);
            (before - factor).abs() > 0.05
        };
        if changed {
            let written = match self.pool.get().await {
                Ok(client) => pages::set_rate_factor(&client, Some(page_id), factor).await,
                Err(e) => Err(e.into()),
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot record the page's slow-down");
            } else {
                tracing::info!(
                    page_id,
                    factor,
                    percent = usage.percent,
                    "Graph usage: page send rate adjusted"
                );
            }
        }
    }

    /// Pauses the page and puts the opt-in back to `pending` with the error: it is sent when
    /// the page resumes, its deadline permitting.
    pub(super) async fn pause_and_keep(
        &self,
        c: &Claimed,
        reason: PauseReason,
        token: Option<&str>,
        f: &GraphFailure,
        err: &StoredError,
    ) -> Result<(), StoreError> {
        self.pause(c, reason, token, f).await;
        let now = OffsetDateTime::now_utc();
        until_lease_end(c, || {
            self.requeue(Requeue::Retry {
                claim: c.clone(),
                at: now,
                error: err.clone(),
            })
        })
        .await?;
        Ok(())
    }

    /// Pauses the page here at once and for every replica (announced once per pause).
    pub(super) async fn pause(
        &self,
        c: &Claimed,
        reason: PauseReason,
        token: Option<&str>,
        f: &GraphFailure,
    ) {
        self.holds.note_pause(&c.page_id, reason);
        self.metrics
            .paused_pages
            .with_label_values(&[c.page_id.as_str()])
            .set(1);
        let detail = f.to_string();
        let written = match self.pool.get().await {
            Ok(mut client) => pages::pause(&mut client, &c.page_id, reason, token, &detail).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot record the page's pause for the other replicas");
        }
    }
}
