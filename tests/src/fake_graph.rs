//! A fake Graph API: a real HTTP server on 127.0.0.1 that stands in for Meta's Send API in
//! tests and in the local demo (`fake-graph` binary), and records every call it receives.
//!
//! It models the rules that matter to loginconnect:
//! - **Tokens.** Each page has one valid token, taken from `Authorization: Bearer` or an
//!   `access_token` query parameter (recorded as [`TokenSource`], so tests can assert the
//!   header is used). Unknown page, wrong or missing token → HTTP 400, code 190.
//!   `me` in a path means the page whose token is presented.
//! - **`appsecret_proof`.** Checked only for pages given an app secret with
//!   [`FakeGraph::require_appsecret_proof`]; missing or wrong → code 100.
//! - **Request shape.** `recipient.login_id` (or `recipient.id`), `messaging_type` and
//!   `message.text` are required, with Meta's limits; else code 100 with a realistic message.
//! - **The window.** A `login_id` registered with [`FakeGraph::register_optin`] can be
//!   messaged until `opted_in_at + 24 h`; at or after that → code 10, subcode 2018278.
//!   Unknown `login_id`s are accepted (lenient), so tests need not register every opt-in.
//! - **One page per login_id.** Once a `login_id` got a message through page A, a send to it
//!   through page B fails with code 100 "(#100) This login_id can only be messaged by the page
//!   it was first messaged through". Meta documents the rule but not the error; this code and
//!   text are *our model* of it.
//! - **Faults.** Scripted answers ([`FakeResponse`]), latency, and a random transient failure
//!   ratio (seeded, so runs are reproducible).
//!
//! Order of decisions for a `/messages` call: token → `appsecret_proof` → body shape →
//! the next **global** scripted answer ([`FakeGraph::push_global`]) → the next
//! **per-recipient** scripted answer ([`FakeGraph::script`]) → the random failure ratio →
//! the window rule → the one-page rule → success. Global answers come first because they
//! model Graph-wide incidents that hit whatever recipient is next; scripted answers are
//! consumed only by authenticated, well-formed sends, so a test's script is never eaten by a
//! request the real Graph would have rejected anyway.
//!
//! Every call is decided and recorded as soon as it arrives; latency and [`FakeResponse::Hang`]
//! only delay the answer. So a client that times out still sees its call in [`FakeGraph::calls`]
//! with the outcome Graph *would* have answered — exactly the "sent, but we never heard" case.

mod reply;
mod send;
mod server;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

/// The API version in the base URL; any version is accepted in paths.
pub const GRAPH_VERSION: &str = "v25.0";
/// The app id that `POST /{page}/subscribed_apps` subscribes (the caller's app).
pub const FAKE_APP_ID: &str = "100000000000001";
/// Seed of the random failure generator, reset by [`FakeGraph::set_failure_rate`].
pub const FAILURE_SEED: u64 = 0x1c0f_fee5;

/// A scripted answer for a Send API call.
#[derive(Debug, Clone, PartialEq)]
pub enum FakeResponse {
    /// Success, whatever the window and one-page rules say.
    Ok,
    /// A Graph error envelope with this status, code, subcode and message.
    Error {
        /// HTTP status (Graph uses 400 for most errors).
        http_status: u16,
        /// `error.code`.
        code: i64,
        /// `error.error_subcode`.
        subcode: Option<i64>,
        /// `error.message`.
        message: String,
    },
    /// A rate-limit error (code 613, 4, 17, 32 or 80006) with an `X-Business-Use-Case-Usage`
    /// header whose `estimated_time_to_regain_access` is `regain_minutes`.
    RateLimited {
        /// `error.code`.
        code: i64,
        /// Minutes until access is regained.
        regain_minutes: u64,
    },
    /// A bare 5xx with an HTML body, as a load balancer answers.
    ServerError(u16),
    /// Waits this long, then behaves normally. Longer than the client timeout, this is the
    /// "Graph processed it but the answer never arrived" case.
    Hang(Duration),
}

impl FakeResponse {
    /// Graph's "(#10) outside of allowed window" error (10/2018278).
    pub fn outside_window() -> Self {
        Self::Error {
            http_status: 400,
            code: 10,
            subcode: Some(2018278),
            message: "(#10) This message is sent outside of allowed window.".into(),
        }
    }

    /// Graph's "(#2) unexpected error, retry later" (HTTP 500, code 2).
    pub fn unexpected() -> Self {
        Self::Error {
            http_status: 500,
            code: 2,
            subcode: None,
            message: reply::UNEXPECTED.into(),
        }
    }
}

/// Where the token of a call came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Header,
    /// `access_token=<token>` in the query string.
    Query,
}

/// One call the fake received, for assertions.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    /// When it arrived.
    pub at: OffsetDateTime,
    /// `GET` or `POST`.
    pub method: String,
    /// The URL path, e.g. `/v25.0/123/messages`.
    pub path: String,
    /// The raw query string (empty when none).
    pub query: String,
    /// The page: resolved from the token for `me`, else the path segment.
    pub page_id: String,
    /// The raw `Authorization` header, if any.
    pub authorization: Option<String>,
    /// Where the token came from (`None`: no token).
    pub token_source: Option<TokenSource>,
    /// The JSON body; a non-JSON body as a JSON string; `Null` when empty.
    pub body: serde_json::Value,
    /// `recipient.login_id` of a send.
    pub login_id: Option<String>,
    /// `ok`, `error:<code>/<subcode>` (`error:<code>` without subcode), or `error:http<status>`
    /// for a bare 5xx.
    pub outcome: String,
}

impl RecordedCall {
    /// True for Send API calls (`.../messages`).
    pub fn is_send(&self) -> bool {
        self.path.ends_with("/messages")
    }
}

/// One app subscribed to a page's webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSubscription {
    /// The app id.
    pub app_id: String,
    /// The subscribed webhook fields.
    pub subscribed_fields: Vec<String>,
}

#[derive(Debug, Default)]
struct FakePage {
    token: String,
    app_secret: Option<String>,
    subscriptions: Vec<FakeSubscription>,
}

/// Everything the server decides on, behind one lock (never held across an await).
struct State {
    pages: HashMap<String, FakePage>,
    optins: HashMap<String, OffsetDateTime>,
    scripts: HashMap<String, VecDeque<FakeResponse>>,
    global: VecDeque<FakeResponse>,
    latency: Duration,
    failure_rate: f64,
    rng: fastrand::Rng,
    /// login_id → the page that first messaged it successfully.
    first_page: HashMap<String, String>,
    /// (page, login_id) → the PSID Graph returns, stable like the real page-scoped id.
    psids: HashMap<(String, String), String>,
    calls: Vec<RecordedCall>,
}

struct Shared {
    state: Mutex<State>,
    /// Number of send calls recorded; waiters use it instead of polling.
    send_count: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide its own failure behind
        // poison errors in every other call.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stops the server when the last [`FakeGraph`] handle is dropped.
struct ServerTask(tokio::task::JoinHandle<()>);

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running fake Graph API. Cheap to clone; the server stops with the last clone.
#[derive(Clone)]
pub struct FakeGraph {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _task: Arc<ServerTask>,
}

impl fmt::Debug for FakeGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeGraph")
            .field("base_url", &self.base_url())
            .finish_non_exhaustive()
    }
}

impl FakeGraph {
    /// Starts a server on 127.0.0.1 with a free port, on the current tokio runtime.
    ///
    /// # Panics
    /// When no local port can be bound (a broken test machine).
    pub async fn start() -> FakeGraph {
        match Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await {
            Ok(fake) => fake,
            Err(e) => panic!("fake Graph: cannot bind 127.0.0.1:0: {e}"),
        }
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeGraph> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pages: HashMap::new(),
                optins: HashMap::new(),
                scripts: HashMap::new(),
                global: VecDeque::new(),
                latency: Duration::ZERO,
                failure_rate: 0.0,
                rng: fastrand::Rng::with_seed(FAILURE_SEED),
                first_page: HashMap::new(),
                psids: HashMap::new(),
                calls: Vec::new(),
            }),
            send_count: watch::Sender::new(0),
        });
        let app = server::router(shared.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "fake Graph server stopped");
            }
        });
        Ok(FakeGraph {
            shared,
            addr,
            _task: Arc::new(ServerTask(task)),
        })
    }

    /// The listening address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v25.0`: what `GRAPH_API_URL` should be set to.
    pub fn base_url(&self) -> String {
        format!("http://{}/{GRAPH_VERSION}", self.addr)
    }

    /// Adds a page with its valid token (replaces the token if the page exists).
    pub fn add_page(&self, page_id: &str, token: &str) {
        let mut state = self.shared.lock();
        state.pages.entry(page_id.to_owned()).or_default().token = token.to_owned();
    }

    /// Changes the page's valid token (a rotated or fixed token); adds the page if unknown.
    pub fn set_token(&self, page_id: &str, token: &str) {
        self.add_page(page_id, token);
    }

    /// From now on calls for this page must carry a valid `appsecret_proof` for `app_secret`.
    pub fn require_appsecret_proof(&self, page_id: &str, app_secret: &str) {
        let mut state = self.shared.lock();
        state
            .pages
            .entry(page_id.to_owned())
            .or_default()
            .app_secret = Some(app_secret.to_owned());
    }

    /// Makes `login_id` known: sends at or after `opted_in_at + 24 h` fail with 10/2018278.
    pub fn register_optin(&self, login_id: &str, opted_in_at: OffsetDateTime) {
        self.shared
            .lock()
            .optins
            .insert(login_id.to_owned(), opted_in_at);
    }

    /// Answers for the next sends to `login_id` (or PSID `recipient.id`), in order; after
    /// them the normal rules apply again. Appends to an existing script.
    pub fn script(&self, login_id: &str, responses: Vec<FakeResponse>) {
        let mut state = self.shared.lock();
        state
            .scripts
            .entry(login_id.to_owned())
            .or_default()
            .extend(responses);
    }

    /// Answers for the next sends to any recipient, in order, before per-recipient scripts.
    pub fn push_global(&self, responses: Vec<FakeResponse>) {
        self.shared.lock().global.extend(responses);
    }

    /// Delay added to every answer.
    pub fn set_latency(&self, d: Duration) {
        self.shared.lock().latency = d;
    }

    /// Fails this ratio (0.0..=1.0) of sends at random, half as a code 1200 error (HTTP 503)
    /// and half as a code 2 error (HTTP 500), both Graph's own retryable failures; reseeds the generator with [`FAILURE_SEED`] so runs repeat exactly.
    pub fn set_failure_rate(&self, transient_ratio: f64) {
        let mut state = self.shared.lock();
        state.failure_rate = transient_ratio.clamp(0.0, 1.0);
        state.rng = fastrand::Rng::with_seed(FAILURE_SEED);
    }

    /// Every call received, in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.shared.lock().calls.clone()
    }

    /// Only the Send API calls (`.../messages`), in arrival order.
    pub fn send_calls(&self) -> Vec<RecordedCall> {
        let state = self.shared.lock();
        state
            .calls
            .iter()
            .filter(|c| c.is_send())
            .cloned()
            .collect()
    }

    /// Waits until at least `n` send calls were received, then returns them all.
    pub async fn wait_for_send_calls(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RecordedCall>, String> {
        let mut rx = self.shared.send_count.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|count| *count >= n)).await {
            Ok(Ok(_)) => Ok(self.send_calls()),
            Ok(Err(_)) => Err("fake Graph: send counter closed".to_owned()),
            Err(_) => {
                let calls = self.send_calls();
                let seen: Vec<String> = calls
                    .iter()
                    .map(|c| format!("{}→{}", c.login_id.as_deref().unwrap_or("?"), c.outcome))
                    .collect();
                Err(format!(
                    "fake Graph: waited {timeout:?} for {n} send calls, got {}: [{}]",
                    calls.len(),
                    seen.join(", ")
                ))
            }
        }
    }

    /// The apps subscribed to the page's webhooks.
    pub fn subscriptions(&self, page_id: &str) -> Vec<FakeSubscription> {
        let state = self.shared.lock();
        state
            .pages
            .get(page_id)
            .map(|p| p.subscriptions.clone())
            .unwrap_or_default()
    }

    /// Sets an app's subscribed fields on a page; an empty list unsubscribes the app.
    pub fn set_subscription(&self, page_id: &str, app_id: &str, fields: &[&str]) {
        let fields = fields.iter().map(|f| (*f).to_owned()).collect();
        let mut state = self.shared.lock();
        let page = state.pages.entry(page_id.to_owned()).or_default();
        set_subscription(page, app_id, fields);
    }
}

fn set_subscription(page: &mut FakePage, app_id: &str, fields: Vec<String>) {
    page.subscriptions.retain(|s| s.app_id != app_id);
    if !fields.is_empty() {
        page.subscriptions.push(FakeSubscription {
            app_id: app_id.to_owned(),
            subscribed_fields: fields,
        });
    }
}
