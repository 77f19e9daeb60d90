//! Test kit of loginconnect: what the integration and end-to-end tests run against.
//!
//! - [`fake_graph`]: a fake Graph API (HTTP server) standing in for Meta's Send API, with
//!   Meta's rules, scripted faults and a record of every call.
//! - [`harness`]: a RabbitMQ vhost and a PostgreSQL database per test, removed afterwards.
//! - [`pipeline`]: starting ingest and the workers in-process against those, and helpers to
//!   post signed deliveries and watch public events.

pub mod contract;
pub mod fake_graph;
pub mod harness;
pub mod pipeline;
