//! The PostgreSQL pool and the embedded migrations.
//!
//! Migrations live in `shared/migrations` and are compiled into every binary; they run under a
//! session advisory lock so that several replicas starting together apply them once.

use std::str::FromStr;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory-lock key that serialises migrations across replicas ("lcmigrat").
const MIGRATION_LOCK_KEY: i64 = 0x6c63_6d69_6772_6174;

/// Errors of connecting to and preparing the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `DATABASE_URL` is not a valid PostgreSQL URL.
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    BadUrl(tokio_postgres::Error),
    /// The pool could not be built.
    #[error("cannot create the PostgreSQL pool: {0}")]
    Pool(String),
    /// No connection could be taken from the pool.
    #[error("cannot connect to PostgreSQL (check DATABASE_URL and that the server runs): {0}")]
    Connect(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("PostgreSQL error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// A migration failed; the database is left at the last version that applied fully.
    #[error("database migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

/// PostgreSQL's own message for an error (tokio-postgres's `Display` says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}: {})", e, db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Builds a pool of at most `max_size` connections (deadpool's default, 4 × cores, is more
/// than a worker needs and multiplies with replicas against `max_connections`).
pub fn pool(url: &str, max_size: usize) -> Result<Pool, DbError> {
    let cfg = deadpool_postgres::Config {
        url: Some(url.to_owned()),
        manager: Some(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        }),
        pool: Some(PoolConfig::new(max_size.max(1))),
        ..Default::default()
    };
    cfg.create_pool(Some(Runtime::Tokio1), NoTls)
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Creates the database named in `url` if it does not exist, connecting to the server's
/// `postgres` database to do so. This lets a bare `cargo run` work on a fresh machine.
pub async fn ensure_database(url: &str) -> Result<(), DbError> {
    let config = tokio_postgres::Config::from_str(url).map_err(DbError::BadUrl)?;
    let Some(name) = config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin.connect(NoTls).await?;
    let conn_task = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match client
            .batch_execute(&format!("CREATE DATABASE {quoted}"))
            .await
        {
            Ok(()) => tracing::info!(database = %name, "created database"),
            Err(e) => {
                // Another process created it between our check and our CREATE (concurrent
                // creates fail with a unique violation, not always `duplicate_database`).
                let exists_now = client
                    .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                    .await?
                    .is_some();
                if !exists_now {
                    return Err(e.into());
                }
            }
        }
    }
    drop(client);
    conn_task.abort();
    Ok(())
}

/// Applies pending migrations under an advisory lock and returns the applied versions.
pub async fn migrate(pool: &Pool) -> Result<Vec<i32>, DbError> {
    let mut client = pool.get().await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let result = embedded::migrations::runner()
        .run_async(&mut **client)
        .await;
    // Unlock whatever happened; the lock is per session and the session returns to the pool.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = result?;
    unlock?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.version())
        .collect())
}

/// The highest migration version known to this binary.
pub fn latest_migration_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}
