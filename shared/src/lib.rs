//! How loginconnect's processes talk and run: the broker, the database, the public events,
//! telemetry and shutdown. Meta's formats themselves (webhook model, signatures, pages file,
//! the Login half) are in `lc_meta`, which has no I/O.
//!
//! Rooms, one job each:
//! - [`topology`]: names and idempotent declaration of every exchange and queue.
//! - [`amqp`]: connecting to RabbitMQ with backoff, the supervised link, publishing with
//!   confirms.
//! - [`outgoing`]: building the AMQP messages of webhook events (ingest, and the CLI's replay)
//!   and publishing a set of them under one confirm deadline.
//! - [`db`]: the PostgreSQL pool and the embedded migrations.
//! - [`events`]: the public CloudEvents model and the transactional outbox insert.
//! - [`optin`]: an opt-in's states and failure reasons, as stored and announced.
//! - [`registry`]: what every process reads of the page registry (its version, app bindings).
//! - [`telemetry`]: logs, traces and the Prometheus registry.
//! - [`shutdown`]: one signal future for graceful shutdown.
//! - [`readiness`]: the per-dependency answer of every process's `/readyz`.
//! - [`config`]: command-line/environment arguments every binary shares.

pub mod amqp;
pub mod config;
pub mod db;
pub mod events;
pub mod optin;
pub mod outgoing;
pub mod readiness;
pub mod registry;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
