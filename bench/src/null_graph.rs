//! A Graph stand-in that records nothing: it answers every Send API call with success and
//! only counts them. The fake Graph keeps every call (1–2 KB each) for assertions, which is
//! right for tests but would show up as growth in a resident-memory measurement.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};

/// A running null Graph; the server stops when this is dropped.
pub struct NullGraph {
    addr: SocketAddr,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl NullGraph {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicU64::new(0));
        let app = Router::new()
            .route("/{version}/{page}/messages", post(send))
            // An HTTP floor for the ingest suite: reads the webhook's body (as ingest must;
            // answering before reading made hyper drop connections mid-body, and 50-event
            // bodies failed) and does nothing else.
            .route(
                "/webhook",
                post(|_body: axum::body::Bytes| async { "EVENT_RECEIVED\n" }),
            )
            .with_state(calls.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, calls, task })
    }

    /// What `GRAPH_API_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}/v25.0", self.addr)
    }

    /// `http://…/webhook`: answers 200 at once (the cost of HTTP alone).
    pub fn webhook_url(&self) -> String {
        format!("http://{}/webhook", self.addr)
    }

    /// Send API calls answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Drop for NullGraph {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn send(State(calls): State<Arc<AtomicU64>>, body: axum::Json<Value>) -> axum::Json<Value> {
    let n = calls.fetch_add(1, Ordering::Relaxed);
    let recipient = body.0["recipient"]["login_id"].clone();
    axum::Json(json!({"recipient_id": recipient, "message_id": format!("m_null{n:016}")}))
}
