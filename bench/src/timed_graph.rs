//! A Graph stand-in for process mode and the soak: answers each Send API call after a set
//! latency and times the opt-in end to end (webhook POST → Graph call), keeping only what is
//! still outstanding. The fake Graph of the tests keeps every call, which a 30-minute soak
//! cannot afford; the null Graph times nothing.
//!
//! The load driver registers each opt-in's `login_id` with the time its POST was due
//! ([`TimedGraph::expect`]); the call for it removes the entry and records the latency to the
//! call's arrival in the current window and the run's total, then answers after the set
//! latency. Calls for a `login_id` not (or no longer) expected are counted as unexpected: a
//! redelivered webhook that led to a second send would show there. A call for a `login_id`
//! whose POST the driver saw fail ([`TimedGraph::forget`]) is counted apart: ingest may answer
//! 503 after its confirm bound while the message was in fact queued (at least once; Meta
//! would deliver again and the scheduler would not send twice), so such a call is the
//! opt-in's one send, not a second. The most recently sent
//! `login_id`s are kept (bounded) for the load's replies, which must
//! name an opt-in that was sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::hist::Latency;

/// How many sent `login_id`s are kept for replies.
const SENT_KEPT: usize = 4096;

#[derive(Default)]
struct Inner {
    expected: HashMap<String, Instant>,
    /// `login_id`s whose POST failed and that have not been sent (yet). Grows only with
    /// failed POSTs.
    forgotten: HashSet<String>,
    /// `(page, login_id)` of the newest sends.
    sent: VecDeque<(String, String)>,
    window: Latency,
    total: Latency,
}

struct Shared {
    latency: Duration,
    calls: AtomicU64,
    unexpected: AtomicU64,
    after_failed_post: AtomicU64,
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind; keep going.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running timed Graph; the server stops when this is dropped.
pub struct TimedGraph {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl TimedGraph {
    /// Starts on a free port of 127.0.0.1, answering each call after `latency`.
    pub async fn start(latency: Duration) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            latency,
            calls: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
            after_failed_post: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
        });
        let app = Router::new()
            .route("/{version}/{page}/messages", post(send))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, shared, task })
    }

    /// What `GRAPH_API_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}/v25.0", self.addr)
    }

    /// Expects one send for `login_id`, timed from `posted_at`.
    pub fn expect(&self, login_id: String, posted_at: Instant) {
        self.shared.lock().expected.insert(login_id, posted_at);
    }

    /// Send API calls answered so far.
    pub fn calls(&self) -> u64 {
        self.shared.calls.load(Ordering::Relaxed)
    }

    /// Stops expecting `login_id` (its POST failed, so no send will come).
    pub fn forget(&self, login_id: &str) {
        let mut inner = self.shared.lock();
        if inner.expected.remove(login_id).is_some() {
            inner.forgotten.insert(login_id.to_owned());
        }
    }

    /// Calls for a `login_id` that was not expected and whose POST did not fail (a second
    /// send, or a stray one): 0 is right.
    pub fn unexpected(&self) -> u64 {
        self.shared.unexpected.load(Ordering::Relaxed)
    }

    /// Calls for a `login_id` whose POST the driver saw fail: the first such call for each is
    /// the opt-in's one send (the POST failed after the message was queued); a later one
    /// counts as [`unexpected`](Self::unexpected).
    pub fn sends_after_failed_posts(&self) -> u64 {
        self.shared.after_failed_post.load(Ordering::Relaxed)
    }

    /// Opt-ins expected but not sent yet.
    pub fn outstanding(&self) -> usize {
        self.shared.lock().expected.len()
    }

    /// A recently sent `(page, login_id)` (the newest first), for a reply; `None` when none
    /// is left.
    pub fn recently_sent(&self) -> Option<(String, String)> {
        self.shared.lock().sent.pop_back()
    }

    /// The end-to-end latencies recorded since the last call (and starts a new window).
    pub fn take_window(&self) -> Latency {
        std::mem::take(&mut self.shared.lock().window)
    }

    /// Every end-to-end latency of the run so far.
    pub fn total(&self) -> Latency {
        self.shared.lock().total.clone()
    }
}

impl Drop for TimedGraph {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn send(
    State(shared): State<Arc<Shared>>,
    Path((_version, page)): Path<(String, String)>,
    body: axum::Json<Value>,
) -> axum::Json<Value> {
    let n = shared.calls.fetch_add(1, Ordering::Relaxed);
    let login_id = body.0["recipient"]["login_id"].as_str().map(str::to_owned);
    let arrived = Instant::now();
    let known = login_id.as_ref().is_some_and(|login_id| {
        let mut inner = shared.lock();
        let Some(posted) = inner.expected.remove(login_id) else {
            if inner.forgotten.remove(login_id) {
                shared.after_failed_post.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            return false;
        };
        let d = arrived.saturating_duration_since(posted);
        inner.window.record(d);
        inner.total.record(d);
        if inner.sent.len() >= SENT_KEPT {
            inner.sent.pop_front();
        }
        inner.sent.push_back((page, login_id.clone()));
        true
    });
    if !known {
        shared.unexpected.fetch_add(1, Ordering::Relaxed);
    }
    // Timed at arrival (webhook → Graph call); the answer then takes the configured latency,
    // which holds the scheduler's in-flight slot as a real Graph would.
    if !shared.latency.is_zero() {
        tokio::time::sleep(shared.latency).await;
    }
    axum::Json(json!({
        "recipient_id": login_id.unwrap_or_default(),
        "message_id": format!("m_timed{n:016}")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn times_expected_sends_and_counts_the_rest() {
        let graph = TimedGraph::start(Duration::ZERO).await.expect("starts");
        graph.expect("a".into(), Instant::now());
        let client = reqwest::Client::new();
        let url = format!("{}/123/messages", graph.base_url());
        for login_id in ["a", "a", "b"] {
            let r = client
                .post(&url)
                .json(&json!({"recipient": {"login_id": login_id}}))
                .send()
                .await
                .expect("answers");
            assert!(r.status().is_success());
        }
        assert_eq!(graph.calls(), 3);
        assert_eq!(graph.unexpected(), 2, "the second `a` and the unknown `b`");
        assert_eq!(graph.outstanding(), 0);
        assert_eq!(graph.take_window().count(), 1);
        assert_eq!(graph.take_window().count(), 0, "a new window is empty");
        assert_eq!(graph.total().count(), 1);
        assert_eq!(graph.recently_sent(), Some(("123".into(), "a".into())));
        assert_eq!(graph.recently_sent(), None);
        graph.expect("c".into(), Instant::now());
        assert_eq!(graph.outstanding(), 1);
        graph.forget("c");
        assert_eq!(graph.outstanding(), 0);
        graph.forget("never expected");
        for login_id in ["c", "c", "never expected"] {
            client
                .post(&url)
                .json(&json!({"recipient": {"login_id": login_id}}))
                .send()
                .await
                .expect("answers");
        }
        assert_eq!(graph.sends_after_failed_posts(), 1, "the first `c` only");
        assert_eq!(
            graph.unexpected(),
            4,
            "the second `c` and an id forgotten without being expected count as unexpected"
        );
    }
}
