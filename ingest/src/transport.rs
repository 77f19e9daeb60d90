//! Serving HTTP connections with bounds a hostile client cannot stretch.
//!
//! Not `axum::serve` (no header-read timeout) and not hyper-util's `auto` builder by default:
//! it reads the protocol preface with no timeout (a connection that sends nothing is held for
//! ever) and serves h2c, whose connections have neither a header nor an idle timeout. So:
//!
//! - **HTTP/1.1 only by default.** hyper's `header_read_timeout` starts when the connection
//!   is first polled, right after accept, and runs again while a kept-alive connection waits
//!   for its next request: a connection that sends nothing, a trickle of header bytes, or only
//!   the HTTP/2 preface is closed after the request timeout.
//! - **HTTP/2 behind an option** ([`Transport::http2`]): then every connection is watched for
//!   idleness from accept — no request in flight for the request timeout (the preface, the
//!   handshake and the gaps between requests included) ends it with a graceful shutdown, and
//!   h2 keep-alive pings drop dead peers.
//! - **A cap on open connections.** Beyond it a new connection is answered `503` with
//!   `Retry-After` at once and closed, without reading its request (Meta redelivers), and
//!   counted; it never queues behind the others.
//!
//! On shutdown, accepting stops, every connection is asked to finish (idle ones close at once,
//! a request in flight completes), and [`serve`] returns when all are gone.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use lc_shared::shutdown::Shutdown;
use prometheus::{IntCounter, IntGauge};
use std::sync::{Mutex, PoisonError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::Service;

/// How connections are served; from [`crate::IngestConfig`].
#[derive(Debug, Clone)]
pub struct Transport {
    /// Bound on reading a request's headers, and on an idle connection (from accept).
    pub request_timeout: Duration,
    /// Also serve HTTP/2 (h2c prior knowledge), with the idle watch described above.
    pub http2: bool,
    /// Most connections open at once; more are answered `503` and closed.
    pub max_connections: usize,
}

/// The connection gauges and counters, registered with the other ingest metrics.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: IntGauge,
    /// Connections answered `503` because [`Transport::max_connections`] were open.
    pub shed: IntCounter,
}

/// The answer to a connection over the cap: short, final, and a hint to retry soon.
const OVERLOADED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
content-length: 41\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many connections; retry in a second\r\n";

/// How long a shed connection may take to receive its `503` and go away.
const SHED_LINGER: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` fires, then drains (see the module doc).
/// `metrics`, when given, counts open and shed connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    transport: Transport,
    metrics: Option<ConnectionMetrics>,
    shutdown: Shutdown,
) -> Result<(), std::io::Error> {
    let max = transport.max_connections.max(1);
    let slots = Arc::new(Semaphore::new(max));
    let transport = Arc::new(transport);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // not fatal. A short pause lets a flood drain instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.wait() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(m) = &metrics {
                m.shed.inc();
            }
            tokio::spawn(shed(stream));
            continue;
        };
        // Small answers (200/503) must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        if let Some(m) = &metrics {
            m.open.inc();
        }
        let (app, transport, metrics, shutdown) = (
            app.clone(),
            Arc::clone(&transport),
            metrics.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            connection(stream, app, &transport, &shutdown).await;
            if let Some(m) = &metrics {
                m.open.dec();
            }
            drop(slot);
        });
    }
    drop(listener);
    // Every connection holds a slot until it is gone: having them all back means drained.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _drained = slots.acquire_many(all).await;
    Ok(())
}

/// Answers `503` and closes, without reading the request: writing first and then reading
/// what the client sent (until it closes or [`SHED_LINGER`]) lets the answer arrive instead of
/// being lost to a reset caused by unread data.
async fn shed(mut stream: TcpStream) {
    let _ = tokio::time::timeout(SHED_LINGER, async {
        stream.write_all(OVERLOADED).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// Serves one connection to its end, within the transport's bounds.
async fn connection(stream: TcpStream, app: Router, transport: &Transport, shutdown: &Shutdown) {
    let io = TokioIo::new(stream);
    let timeout = transport.request_timeout;
    if transport.http2 {
        let activity = Arc::new(Activity::new());
        let service = TowerToHyperService::new(tracked(app, Arc::clone(&activity)));
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(timeout))
            .keep_alive_timeout(timeout)
            .max_concurrent_streams(100);
        let conn = builder.serve_connection(io, service);
        drive(conn, Some(&activity), timeout, shutdown).await;
    } else {
        let service = TowerToHyperService::new(app);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(timeout);
        let conn = builder.serve_connection(io, service);
        drive(conn, None, timeout, shutdown).await;
    }
}

/// Runs `conn` until it ends, shutdown fires, or (with `activity`) it has been idle for
/// `timeout`; in the last two cases it is asked to finish gracefully and dropped if it has
/// not within another `timeout` (a request in flight is itself bounded by the timeout).
async fn drive<C>(conn: C, activity: Option<&Activity>, timeout: Duration, shutdown: &Shutdown)
where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let idle = async {
        match activity {
            Some(a) => a.idle_for(timeout).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        result = conn.as_mut() => Some(result),
        () = shutdown.wait() => None,
        () = idle => None,
    };
    let result = match ended {
        Some(result) => result,
        None => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(timeout, conn).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection closed with an error");
    }
}

/// Requests in flight on one connection and when the last one ended (or the connection was
/// accepted): what the HTTP/2 idle watch reads.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        }
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// Completes once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            tokio::time::sleep_until(self.last() + timeout).await;
            if self.in_flight.load(Ordering::Acquire) == 0 {
                if self.last() + timeout <= Instant::now() {
                    return;
                }
            } else {
                // A request is in flight (bounded by the router's timeout): look again soon.
                tokio::time::sleep(timeout / 4).await;
            }
        }
    }
}

/// Marks a request in flight until dropped, then records when it ended.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The end counts as activity before the request stops counting as in flight, so the
        // watch never sees an idle connection whose last request just ended.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `app`, marking each request busy on `activity` while it is handled.
fn tracked(
    app: Router,
    activity: Arc<Activity>,
) -> impl Service<
    axum::http::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send,
> + Clone {
    tower::service_fn(move |req: axum::http::Request<Incoming>| {
        let mut app = app.clone();
        let busy = Busy::start(Arc::clone(&activity));
        async move {
            let response = app.call(req).await;
            drop(busy);
            response
        }
    })
}
