//! The counters of the Login half ([`LoginMetrics`]), shared by both of its endpoints.

use prometheus::{IntCounterVec, Opts, Registry};

/// Counters of the Login half, registered in ingest's registry.
#[derive(Clone)]
pub struct LoginMetrics {
    /// `POST /login-events` by result.
    pub login_events: IntCounterVec,
    /// `POST /data-deletion` by result.
    pub deletion_requests: IntCounterVec,
}

impl LoginMetrics {
    /// Creates the counters and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let login_events = IntCounterVec::new(
            Opts::new(
                "ingest_login_events_total",
                "POST /login-events requests by result (accepted, unauthorized, bad_request, \
                 unprocessable, unavailable)",
            ),
            &["result"],
        )?;
        let deletion_requests = IntCounterVec::new(
            Opts::new(
                "ingest_data_deletion_requests_total",
                "POST /data-deletion requests by result",
            ),
            &["result"],
        )?;
        // Every known label starts at zero, so a rate() has a series before the first event.
        for result in [
            "accepted",
            "unauthorized",
            "bad_request",
            "unprocessable",
            "unavailable",
        ] {
            login_events.with_label_values(&[result]);
        }
        for result in ["accepted", "unauthorized", "bad_request", "unavailable"] {
            deletion_requests.with_label_values(&[result]);
        }
        registry.register(Box::new(login_events.clone()))?;
        registry.register(Box::new(deletion_requests.clone()))?;
        Ok(Self {
            login_events,
            deletion_requests,
        })
    }
}
