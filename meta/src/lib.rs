//! Meta's formats, as loginconnect reads and writes them — pure functions and types, no I/O
//! (no broker, database or HTTP client), so the fuzz targets and the parser benchmarks build
//! this crate alone.
//!
//! Rooms, one job each:
//! - [`webhook`]: typed parsing of Meta's webhook envelope into a flat list of events, and the
//!   [`webhook::QueuedEvent`] envelope each event travels in between our processes.
//! - [`signature`]: `X-Hub-Signature-256` (and legacy SHA-1) verification over raw bytes.
//! - [`secret`]: a string wrapper whose `Debug`/`Display` never show the value.
//! - [`pages`]: the `PAGES_FILE` format and its validation against Meta's limits.
//! - [`ids`]: the checks every id and event time passes before it is stored.
//! - [`login`]: the Login half: computed login_ids, the Login dialog URL, login-event
//!   signatures, Meta's `signed_request` and the data deletion request and its codes.

pub mod ids;
pub mod login;
pub mod pages;
pub mod secret;
pub mod signature;
pub mod webhook;
