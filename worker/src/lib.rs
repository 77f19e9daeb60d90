//! The workers of loginconnect: the scheduler (first messages before the deadline), the
//! correlator (login_id → PSID links), the outbox relay both run, and the operator CLI.
//!
//! Rooms, following the data:
//! - [`runtime`]: what every worker process runs on — configuration, the batched consumer,
//!   the health/metrics server, the shared process wiring.
//! - [`scheduler`]: recording opt-ins and dispatching first messages (its SQL in
//!   [`scheduler::store`]).
//! - [`graph`]: the Graph API client (Send API, subscriptions, token check) and the
//!   classification of its answers; used by the scheduler and the watchdog.
//! - [`watchdog`]: re-subscribes pages whose webhook subscription Meta dropped.
//! - [`deletion`]: carries out user data deletion requests (opt-ins and links alike).
//! - [`correlator`]: joining replies to opt-ins.
//! - [`funnel`]: the opt-in funnel (opted in → sent → replied → linked) for the admin API, the
//!   CLI and the scheduler's gauges.
//! - [`relay`]: the outbox relay that publishes public events with confirms.
//! - [`registry`]: the page registry (apps, pages) every replica reads, its operations.
//! - [`admin`]: the admin API over the registry (`loginconnect admin`).
//! - [`operate`]: what operators read and do (opt-ins at risk, failures, timelines, retries,
//!   dead letters), shared by the admin API, the console and the CLI.
//! - [`cli`]: the `loginconnect` operator CLI.

pub mod admin;
pub mod cli;
pub mod correlator;
pub mod deletion;
pub mod funnel;
pub mod graph;
pub mod operate;
pub mod registry;
pub mod relay;
pub mod runtime;
pub mod scheduler;
pub mod watchdog;
