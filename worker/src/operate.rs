//! What an operator looks at and does day to day, as library functions over the admin's
//! database pool (and an AMQP endpoint for dead letters): the admin API's handlers, the
//! console's HTML views and the CLI call the same code.
//!
//! - [`at_risk`]: pending and sending opt-ins, nearest deadline first;
//! - [`failures`]: recent failed and expired opt-ins with Graph's error;
//! - [`timeline`]: one opt-in's life, step by step, with its public events;
//! - [`retry`]: a failed opt-in sent again while its window is open, when that is safe;
//! - [`dead_letters`]: the dead-letter queues listed and replayed (whole, or one message).
//!
//! Reads take any [`deadpool_postgres::GenericClient`]; every write is logged with the actor
//! (the admin token's name, `cli`, or the console's user) and a label of the login_id, never
//! the id itself.

pub mod at_risk;
pub mod dead_letters;
pub mod failures;
pub mod retry;
pub mod timeline;

pub use at_risk::{AtRisk, at_risk};
pub use failures::{Failure, GraphError, failures};
pub use retry::{RetryOutcome, RetryRefusal, retry};
pub use timeline::{EventKind, Step, StepKind, Timeline, TimelineEvent, timeline};

/// The most rows a list returns, whatever the caller asks for: the lists are for people.
pub const MAX_LIMIT: i64 = 500;

/// Why a read or a retry failed. Database errors say what to check; nothing here carries a
/// login_id.
#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    /// A statement failed.
    #[error("database error: {} (check that DATABASE_URL answers and is migrated)", lc_shared::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("database connection error: {0} (check DATABASE_URL and DATABASE_POOL_SIZE)")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// `limit` clamped to `1..=MAX_LIMIT`.
pub fn clamp_limit(limit: i64) -> i64 {
    limit.clamp(1, MAX_LIMIT)
}
