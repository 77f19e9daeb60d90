//! Test kit of loginconnect: what the integration and end-to-end tests run against.
//!
//! - [`fake_graph`]: a fake Graph API (HTTP server) standing in for Meta's Send API, with
//!   Meta's rules, scripted faults and a record of every call.
//! - [`harness`]: a RabbitMQ vhost and a PostgreSQL database per test, removed afterwards.
//! - [`pipeline`]: [`pipeline::TestEnv`], the one environment of every test (a vhost, a
//!   database, a fake Graph and a pages file), starting ingest and the workers in-process
//!   against it, posting signed deliveries and watching public events.
//! - [`login`]: the Login half (login events, data deletion) on top of a `TestEnv`.
//! - [`admin`]: the admin API on a `TestEnv`, with a read and a write token;
//!   [`browser`]: headless Chromium through chromedriver, for the web console's tests.
//! - [`contract`]: the published JSON Schemas every captured event is checked against.
//! - [`private`]: a RabbitMQ node and a PostgreSQL cluster of a test's (or the fault suite's)
//!   own, started from the machine's installations on free ports (TLS listeners included);
//!   [`tls`]: a test CA and certificates made at test time; [`pgbouncer`]: a PgBouncer of a
//!   test's own in front of PostgreSQL.

pub mod admin;
pub mod browser;
pub mod contract;
pub mod fake_graph;
pub mod harness;
pub mod login;
pub mod pgbouncer;
pub mod pipeline;
pub mod private;
pub mod tls;
