//! [`IngestError`], in a room of its own so the rooms that fail with it (the Login half's
//! setup) need not import the crate root that wires them together.

use std::net::SocketAddr;

/// Errors that stop the ingest service.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A listen address cannot be bound.
    #[error("cannot listen on {addr}: {source} (is another process using the port? set {var})")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The variable that sets it (`INGEST_ADDR` or `INGEST_ADMIN_ADDR`).
        var: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("HTTP server error: {0}")]
    Serve(std::io::Error),
    /// Metrics could not be registered.
    #[error("metrics registry error: {0}")]
    Metrics(#[from] prometheus::Error),
}
