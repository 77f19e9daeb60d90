//! Benchmark harness of loginconnect: every stage measured against the ceiling of the machine
//! it runs on, side by side in one run. These are measurements, not tests: nothing here is a
//! timed assertion.
//!
//! `cargo run --release -p bench -- <ingest|scheduler|correlator|scale|all> [--quick]` starts
//! what it measures **in-process** (ingest, scheduler, correlator, the fake Graph and the load
//! generator share one process) against the local RabbitMQ and PostgreSQL, in a scratch vhost
//! and database per suite, and prints a table, `name=value` lines, and `bench/results/<suite>.json`.
//!
//! Layout:
//! - [`suites`]: the suite names and the dispatcher the binary calls;
//! - [`ingest`], [`scheduler`] (with [`skew`]: many pages, one with a backlog, and
//!   [`prune_drain`]: a large drain with pruning on), [`correlator`], [`scale`] (with
//!   [`expiry`]): one module per suite, each with its parameters (`quick()`, `full()`) and its
//!   ceiling;
//! - [`env`]: the scratch environment (vhost, database, fake Graph, pages file) and starting
//!   the services with their production defaults;
//! - [`load`]: closed-loop (fixed concurrency, steady-state window) and open-loop (fixed
//!   arrival rate) load drivers; [`bodies`]: realistic signed webhook bodies;
//! - [`hist`]: HDR latency histograms; [`edf`]: the offline optimum for deadline misses;
//!   [`null_graph`]: a non-recording Graph for memory measurements;
//! - [`report`]: figures, targets, rendering and JSON; [`machine`]: cores, RAM, load average,
//!   service versions and this process's RSS.

pub mod bodies;
pub mod correlator;
pub mod edf;
pub mod env;
pub mod expiry;
pub mod hist;
pub mod ingest;
pub mod load;
pub mod machine;
pub mod null_graph;
pub mod prune_drain;
pub mod report;
pub mod scale;
pub mod scheduler;
pub mod skew;
pub mod suites;
