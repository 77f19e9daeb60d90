//! A TCP proxy that slows the database down: every process's `DATABASE_URL` points at it (in
//! the scale-out mode, or with `--db-latency-ms`), and it forwards each connection to the
//! real server, holding every chunk of bytes back by a delay the suite may change mid-run.
//!
//! Each direction of a connection is a reader and a writer joined by a bounded queue: the
//! reader stamps each chunk with `read time + delay` and the writer sends the chunks in the
//! order they were read, each no earlier than its stamp. So the delay is added once per chunk
//! (not once per chunk *queued ahead of it*: throughput is not throttled), bytes are never
//! reordered within a direction, and a change of the delay applies to chunks read from then
//! on. A connection that fails on one side is closed on both; a clean end of one direction
//! (`EOF`) is passed on as a half-close after the chunks before it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Chunks that may wait in one direction before the reader stops reading (backpressure).
const QUEUE: usize = 64;
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;

/// A running latency proxy; stops accepting when dropped (open connections end with their
/// peers).
pub struct LatencyProxy {
    addr: SocketAddr,
    delay_us: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LatencyProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream` with `delay` per chunk.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("the database proxy cannot bind a port")?;
        let addr = listener.local_addr()?;
        let delay_us = Arc::new(AtomicU64::new(micros(delay)));
        let shared = delay_us.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of file descriptors or the like: wait instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(serve(client, upstream, shared.clone()));
            }
        });
        Ok(Self {
            addr,
            delay_us,
            task,
        })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Changes the delay of every chunk read from now on (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(micros(delay), Ordering::Relaxed);
    }

    /// The current delay per chunk.
    pub fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::Relaxed))
    }
}

impl Drop for LatencyProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// One client connection: connects upstream and pipes both ways until both directions end
/// or either fails. A refused upstream (the server is down) closes the client at once.
async fn serve(client: TcpStream, upstream: SocketAddr, delay_us: Arc<AtomicU64>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    // `try_join`: an error in one direction drops the other (both sockets close).
    let _ = tokio::try_join!(
        pipe(client_read, server_write, delay_us.clone()),
        pipe(server_read, client_write, delay_us),
    );
}

/// One direction: reads chunks and writes each at its read time plus the delay, in order.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay_us: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // Dropping the sender tells the writer: nothing more, half-close after the rest.
                return Ok::<(), std::io::Error>(());
            }
            let due = Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
            if tx.send((due, buf[..n].to_vec())).await.is_err() {
                return Err(std::io::Error::other("the writer side is gone"));
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            to.write_all(&bytes).await?;
        }
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes everything it got once the client half-closed.
    async fn echo_once() -> SocketAddr {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            s.write_all(&all).await.unwrap();
        });
        upstream
    }

    #[tokio::test]
    async fn forwards_in_order_with_the_delay_and_passes_the_end_on() {
        let proxy = LatencyProxy::start(echo_once().await, Duration::from_millis(30))
            .await
            .unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        for i in 0..50u8 {
            c.write_all(&[i; 100]).await.unwrap();
            if i == 25 {
                // The chunks so far are read with the delay; those after it overtake nothing.
                tokio::time::sleep(Duration::from_millis(5)).await;
                proxy.set_delay(Duration::ZERO);
            }
        }
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        let expected: Vec<u8> = (0..50u8).flat_map(|i| [i; 100]).collect();
        assert_eq!(back, expected, "every byte, in order");
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert_eq!(proxy.delay(), Duration::ZERO);
    }

    #[tokio::test]
    async fn a_refused_upstream_closes_the_client() {
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = gone.local_addr().unwrap();
        drop(gone);
        let proxy = LatencyProxy::start(upstream, Duration::ZERO).await.unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", proxy.port()))
            .await
            .unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
}
