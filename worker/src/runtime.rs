//! What every worker process runs on, whatever its own job: arguments and start-up steps,
//! the batched AMQP consumer, the `/metrics` `/healthz` `/readyz` server, and the wiring both
//! workers share beside their own work.
//!
//! - [`batch_failure`]: which failure of a pipelined batch to act on (intake, correlator).
//! - [`config`]: arguments and start-up steps shared by the workers.
//! - [`consumer`]: the batched AMQP consumer that acks after commit and dead-letters.
//! - [`db_probe`]: the periodic database check behind `/readyz`.
//! - [`http`]: the `/metrics`, `/healthz`, `/readyz` server of each worker.
//! - [`lock_order`]: the one order in which every writer locks people's rows.
//! - [`process`]: what both workers run beside their own work (that server, the relay, the
//!   supervisor task).

pub mod batch_failure;
pub mod config;
pub mod consumer;
pub mod db_probe;
pub mod http;
pub mod lock_order;
pub mod process;
