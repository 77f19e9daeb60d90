//! Whether Graph can be reached, as the scheduler's `/readyz` reports it: the outcome of the
//! most recent Graph call of this process (Send API, subscription checks), recorded by
//! [`super::GraphClient`] on every call. `/readyz` itself never calls Graph — a probe per
//! request would cost calls against the app's rate limit and tell no more than the sends do.
//!
//! A call *did not reach* Graph when no answer came (a refused connection, a timeout, a
//! connection lost after sending) or the answer was a server error (HTTP 5xx, Graph's own or
//! a gateway's in front of it). Any other answer — a success, or a Graph error about the
//! request such as an invalid recipient or a rate limit — proves Graph is there. A process
//! that has made no call yet reports Graph as fine, with a note saying so.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use lc_shared::readiness::Check;

use super::classify::{FailureClass, GraphFailure};

/// The last outcome of this process's Graph calls. Cheap to clone: clones share it.
#[derive(Debug, Clone, Default)]
pub struct GraphReach {
    last: Arc<Mutex<Last>>,
}

/// What the most recent call showed.
#[derive(Debug, Default)]
enum Last {
    /// No call yet.
    #[default]
    NoCall,
    /// The most recent call got an answer from Graph.
    Reached,
    /// The most recent calls did not reach Graph.
    Unreachable {
        /// When the first of the failing run did not reach it.
        since: Instant,
        /// Calls in a row that did not reach Graph.
        in_a_row: u64,
        /// What the most recent one reported (tokens already scrubbed by the client).
        reason: String,
    },
}

/// True if `failure` shows that Graph (or the way to it) failed rather than the request: no
/// answer at all, or a server error. A failure made locally before any call (a token that
/// cannot be a header) has no status but is neither.
pub fn unreachable(failure: &GraphFailure) -> bool {
    match failure.http_status {
        Some(status) => status >= 500,
        None => matches!(
            failure.class,
            FailureClass::Transient | FailureClass::OutcomeUnknown
        ),
    }
}

impl GraphReach {
    /// Records the outcome of one call.
    pub fn record(&self, failure: Option<&GraphFailure>) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match failure.filter(|f| unreachable(f)) {
            None => *last = Last::Reached,
            Some(f) => {
                let (since, in_a_row) = match &*last {
                    Last::Unreachable {
                        since, in_a_row, ..
                    } => (*since, in_a_row + 1),
                    Last::NoCall | Last::Reached => (Instant::now(), 1),
                };
                *last = Last::Unreachable {
                    since,
                    in_a_row,
                    reason: f.to_string(),
                };
            }
        }
    }

    /// The `graph` check of `/readyz`, advisory (see the scheduler's wiring for why).
    pub fn check(&self) -> Check {
        let last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match &*last {
            Last::NoCall => Check::pass()
                .advisory()
                .noting("no Graph call made yet by this process"),
            Last::Reached => Check::pass().advisory(),
            Last::Unreachable {
                since,
                in_a_row,
                reason,
            } => Check::fail(format!(
                "the last {in_a_row} Graph call(s), for {}s, did not reach Graph; the last one: \
                 {reason}. Sends are retried with backoff until their deadline",
                since.elapsed().as_secs()
            ))
            .advisory(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(class: FailureClass, status: Option<u16>) -> GraphFailure {
        GraphFailure::local(class, status, "what happened")
    }

    #[test]
    fn only_missing_answers_and_server_errors_count_as_unreachable() {
        let reach = GraphReach::default();
        let first = reach.check();
        assert!(first.ok && !first.required && first.reason.is_some());
        reach.record(Some(&failure(FailureClass::Transient, None)));
        reach.record(Some(&failure(FailureClass::OutcomeUnknown, Some(502))));
        let check = reach.check();
        assert!(!check.ok && !check.required);
        let reason = check.reason.expect("reason");
        assert!(reason.contains("last 2 Graph call(s)"), "{reason}");
        assert!(reason.contains("HTTP 502"), "{reason}");
        // A Graph error about the request proves Graph answered.
        reach.record(Some(&failure(FailureClass::Permanent, Some(400))));
        assert!(reach.check().ok);
        reach.record(Some(&failure(FailureClass::TokenInvalid, None)));
        assert!(reach.check().ok, "a local refusal says nothing about Graph");
        reach.record(Some(&failure(FailureClass::OutcomeUnknown, None)));
        assert!(!reach.check().ok);
        reach.record(None);
        assert_eq!(reach.check(), Check::pass().advisory());
    }
}
