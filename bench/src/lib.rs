//! Benchmark harness of loginconnect: every stage measured against the ceiling of the machine
//! it runs on, side by side in one run. These are measurements, not tests: nothing here is a
//! timed assertion.
//!
//! `cargo run --release -p bench -- <ingest|scheduler|correlator|scale|all> [--quick]` starts
//! what it measures **in-process** (ingest, scheduler, correlator, the fake Graph and the load
//! generator share one process; `procs` and `soak` start each service as its own process)
//! against the local RabbitMQ and PostgreSQL, in a scratch vhost
//! and database per suite, and prints a table, `name=value` lines, and `bench/results/<suite>.json`.
//!
//! Layout:
//! - [`suites`]: the suite names and the dispatcher the binary calls;
//! - [`ingest`] (with [`amqprs_publisher`]: a second bare-publisher ceiling on another AMQP
//!   client), [`scheduler`] (with [`skew`]: many pages, one with a backlog, and
//!   [`prune_drain`]: a large drain with pruning on), [`correlator`], [`scale`] (with
//!   [`paused_claim`] and [`expiry`]): one module per suite, each with its parameters (`quick()`, `full()`) and its
//!   ceiling;
//! - [`env`]: the scratch environment (vhost, database, fake Graph, pages file) and starting
//!   the services with their production defaults;
//! - [`load`]: closed-loop (fixed concurrency, steady-state window) and open-loop (fixed
//!   arrival rate) load drivers; [`bodies`]: realistic signed webhook bodies;
//! - [`hist`]: HDR latency histograms; [`edf`]: the offline optimum for deadline misses;
//!   [`null_graph`]: a non-recording Graph for memory measurements;
//! - [`procs`]: process mode, each service its own OS process ([`child`]: finding the release
//!   binaries, starting them with their environment, killing them on drop; [`proc_stats`]:
//!   `VmHWM`, `VmRSS` and CPU seconds of any process); [`soak`]: a sustained mixed load on
//!   those processes at half the capacity a ramp of the same mix finds ([`soak_probe`]),
//!   sampled each minute ([`soak_sample`]) with a flat/growing verdict per
//!   series ([`trend`]: least squares and its 95 % interval); [`mixed`]: the streaming open
//!   loop of opt-ins, replies and redeliveries they share; [`timed_graph`]: a Graph stand-in
//!   timing each opt-in end to end with bounded memory; [`rss_drain`]: the scheduler binary
//!   alone draining a backlog, its RSS against sends (leak or plateau, allocator A/B);
//! - [`report`]: figures, targets, rendering and JSON; [`machine`]: cores, RAM, load average,
//!   service versions and this process's RSS.

pub mod amqprs_publisher;
pub mod bodies;
pub mod child;
pub mod correlator;
pub mod edf;
pub mod env;
pub mod expiry;
pub mod hist;
pub mod ingest;
pub mod load;
pub mod machine;
pub mod mixed;
pub mod null_graph;
pub mod paused_claim;
pub mod proc_stats;
pub mod procs;
pub mod prune_drain;
pub mod report;
pub mod rss_drain;
pub mod scale;
pub mod scheduler;
pub mod skew;
pub mod soak;
pub mod soak_probe;
pub mod soak_sample;
pub mod suites;
pub mod timed_graph;
pub mod trend;
