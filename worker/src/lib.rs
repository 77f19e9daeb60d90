//! The workers of loginconnect: the scheduler (first messages before the deadline), the
//! correlator (login_id → PSID links), the outbox relay both run, and the operator CLI.
//!
//! Layout:
//! - [`config`]: arguments and start-up steps shared by the workers.
//! - [`consumer`]: the batched AMQP consumer that acks after commit and dead-letters.
//! - [`http`]: the `/metrics`, `/healthz`, `/readyz` server of each worker.
//! - [`process`]: what both workers run beside their own work (that server, the relay, the
//!   supervisor task).
//! - [`graph`]: the Graph API client (Send API, subscriptions, token check) and the
//!   classification of its answers.
//! - [`relay`]: the outbox relay that publishes public events with confirms.
//! - [`scheduler`]: recording opt-ins and dispatching first messages.
//! - [`correlator`]: joining replies to opt-ins.
//! - [`cli`]: the `loginconnect` operator CLI.

pub mod cli;
pub mod config;
pub mod consumer;
pub mod correlator;
pub mod graph;
pub mod http;
pub mod process;
pub mod relay;
pub mod scheduler;
