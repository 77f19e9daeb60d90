//! Shared library of loginconnect, used by the `ingest` binary and the workers.
//!
//! Layout, one job per module:
//! - [`webhook`]: typed parsing of Meta's webhook envelope into a flat list of events, and the
//!   [`webhook::QueuedEvent`] envelope each event travels in on RabbitMQ.
//! - [`signature`]: `X-Hub-Signature-256` (and legacy SHA-1) verification over raw bytes.
//! - [`secret`]: a string wrapper whose `Debug`/`Display` never show the value.
//! - [`topology`]: names and idempotent declaration of every exchange and queue.
//! - [`amqp`]: connecting to RabbitMQ with backoff and publishing with confirms.
//! - [`db`]: the PostgreSQL pool and the embedded migrations.
//! - [`events`]: the public CloudEvents model and the transactional outbox insert.
//! - [`pages`]: the `PAGES_FILE` format and its validation against Meta's limits.
//! - [`graph`]: the Graph Send API client and the classification of its answers.
//! - [`login`]: the Login half: computed login_ids, the Login dialog URL, login-event
//!   signatures, Meta's `signed_request` and data deletion requests.
//! - [`telemetry`]: logs, traces and the Prometheus registry.
//! - [`shutdown`]: one signal future for graceful shutdown.
//! - [`config`]: command-line/environment arguments every binary shares.

pub mod amqp;
pub mod config;
pub mod db;
pub mod events;
pub mod graph;
pub mod login;
pub mod pages;
pub mod secret;
pub mod shutdown;
pub mod signature;
pub mod telemetry;
pub mod topology;
pub mod webhook;
