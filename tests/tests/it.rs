//! The integration and end-to-end tests of loginconnect in one test binary, each file beside
//! this one a module of it.
//!
//! One binary instead of one per file because each binary links the whole service stack
//! (tokio, lapin, PostgreSQL, HTTP, every crate of the workspace): after a change in the test
//! kit, rebuilding took about 36 s of CPU with seventeen binaries and takes about 11 s with
//! three on the 2-core machine. Nextest still runs every test in a process of its own.
//!
//! `secrets.rs` and `tracing.rs` stay binaries of their own (see `Cargo.toml`): each
//! installs the process-wide tracing subscriber, so under `cargo test`, which runs a
//! binary's tests as threads of one process, they would take it from each other.
//!
//! A new test file must be named below (or, if it needs a process of its own, as a `[[test]]`
//! in `Cargo.toml`): with `autotests = false`, a file named nowhere is neither built nor run.

mod abuse;
mod admin_api;
mod amqp_nodes;
mod amqp_tls;
mod app_binding;
mod claim_plan;
mod cli;
mod console;
mod contract;
mod correlator;
mod correlator_loops;
mod crash_window;
mod data_deletion;
mod db_failover;
mod db_tls;
mod dead_letters;
mod deployment;
mod funnel;
mod graph_client;
mod ingest;
mod intake_isolation;
mod linking;
mod login_events;
mod monitoring;
mod never_again;
mod observability;
mod openapi;
mod operate;
mod operational_events;
mod personalised;
mod pgbouncer;
mod readiness;
mod registry;
mod relay;
mod relay_order;
mod scale_out;
mod scheduler;
mod scheduler_recovery;
mod start_up;
mod tenant_events;
mod watchdog;
