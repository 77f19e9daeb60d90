//! The page registry: apps and pages in PostgreSQL, the source of truth for every replica.
//!
//! - [`model`]: what the registry holds and what its operations take and return;
//! - [`store`]: the registry's SQL (rows of `apps` and `pages`, the version counter);
//! - [`import`]: the pages file imported into the registry (idempotent);
//! - [`view`]: one replica's pages, built from the registry, the stored tokens and its own
//!   pages file (the tokens the file gives);
//! - [`ops`]: the operations the admin API and the `loginconnect` CLI both call (one
//!   implementation; every write is logged with who made it);
//! - [`lookup`]: opt-in and link look-ups.
//!
//! What happens to the pages file: it is imported at start and whenever it changes. A page's
//! definition from the file is applied only when the file's definition changed since the
//! last import (a SHA-256 of it is stored), so an edit made through the API survives a
//! restart until someone edits that page in the file. A page that left the file is kept,
//! marked `in_pages_file: false`, logged as a warning, and deleted only through the API or
//! the CLI; without a token of its own in the database (the file gave its token) no replica
//! can send for it, exactly as before the registry.

pub mod import;
pub mod lookup;
pub mod model;
pub mod ops;
pub mod store;
pub mod view;

use crate::scheduler::store::StoreError;
use crate::scheduler::tokens::TokenKeyError;

/// Why a registry operation failed. The API maps the kinds to HTTP statuses; every text says
/// what was wrong and what to do, and never holds a token.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Nothing with that id.
    #[error("{0}")]
    NotFound(String),
    /// The input breaks a rule; the text names the field.
    #[error("{0}")]
    Invalid(String),
    /// The operation contradicts the current state (exists already, still in the pages file).
    #[error("{0}")]
    Conflict(String),
    /// Token encryption is not configured or a stored token does not decrypt.
    #[error("{0}")]
    Keys(#[from] TokenKeyError),
    /// The database failed.
    #[error("database error: {}", lc_shared::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    /// No connection.
    #[error("database connection error: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The scheduler's page-state SQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
