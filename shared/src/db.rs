//! The PostgreSQL pool and the embedded migrations.
//!
//! Migrations live in `shared/migrations` and are compiled into every binary; they run under a
//! session advisory lock so that several replicas starting together apply them once.
//!
//! A pooler in transaction or statement mode is refused at start-up
//! ([`refuse_transaction_pooling`]; its module says why and how it tells).
//!
//! Every connection goes through [`tls`] (libpq's `sslmode`/`sslrootcert`, default `prefer`).
//! `DATABASE_URL` may name several hosts (`postgres://a:5432,b:5432/db?
//! target_session_attrs=read-write`): tokio-postgres tries them in order and, with
//! `read-write`, skips a standby, so a promoted standby is found without a DNS change.

mod pooler;
pub mod tls;

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres_rustls::MakeRustlsConnect;

pub use pooler::refuse_transaction_pooling;
pub use tls::{SslMode, TlsError, TlsSettings};

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
    /// The TLS settings of `DATABASE_URL` cannot be used.
    #[error("DATABASE_URL: {0}")]
    Tls(#[from] TlsError),
    /// The first connection failed; the text names the TLS settings and the cause.
    #[error("cannot connect to PostgreSQL ({settings}): {cause}")]
    FirstConnect {
        /// [`TlsSettings::describe`].
        settings: String,
        /// What failed, with a hint where one helps.
        cause: String,
        /// Whether trying again later may succeed (see [`DbError::is_transient`]).
        transient: bool,
    },
    /// `DATABASE_URL` leads to a pooler that shares server sessions between statements.
    #[error(
        "DATABASE_URL leads to a connection pooler in transaction or statement mode ({evidence}); loginconnect needs a server session per connection (session advisory locks for migrations and the watchdog, LISTEN for the outbox relay, prepared statements): point DATABASE_URL at PostgreSQL itself or at a PgBouncer pool with pool_mode = session"
    )]
    TransactionPooler {
        /// What the check saw.
        evidence: String,
    },
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

impl DbError {
    /// Whether trying again later may succeed without a change of configuration: the server
    /// did not answer or closed the connection (down, restarting, a failover under way, a
    /// network blip), or answered with a connection-class (08) or operator-intervention
    /// (57: shutting down, starting up, in recovery) SQLSTATE, or had too many connections.
    /// Not transient: a URL or TLS setting that cannot work (a certificate refused, a server
    /// that wants TLS), authentication and other refusals, a transaction pooler, migrations.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::FirstConnect { transient, .. } => *transient,
            Self::Connect(deadpool_postgres::PoolError::Backend(e)) | Self::Query(e) => {
                is_transient(e)
            }
            Self::Connect(_) => true,
            Self::BadUrl(_)
            | Self::Tls(_)
            | Self::TransactionPooler { .. }
            | Self::Pool(_)
            | Self::Migration(_) => false,
        }
    }
}

/// See [`DbError::is_transient`]: no answer from the server, or an 08/57/53300 SQLSTATE.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => {
            let code = code.code();
            code.starts_with("08") || code.starts_with("57") || code == "53300"
        }
        None => true,
    }
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

/// A parsed `DATABASE_URL`: tokio-postgres's configuration, the TLS connector its settings
/// ask for, and the settings themselves (for error messages).
#[derive(Clone)]
pub struct Target {
    /// Hosts, database, user, options; `ssl_mode` already set from the TLS settings.
    pub config: tokio_postgres::Config,
    /// The rustls connector (used whenever TLS is negotiated).
    pub tls: MakeRustlsConnect,
    /// What the URL asked for.
    pub settings: TlsSettings,
}

impl Target {
    /// Parses `url` (see [`tls::split`] for the TLS settings).
    pub fn parse(url: &str) -> Result<Self, DbError> {
        let (rest, settings) = tls::split(url)?;
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(DbError::BadUrl)?;
        config.ssl_mode(settings.postgres_mode());
        let tls = tls::connector(&settings)?;
        Ok(Self {
            config,
            tls,
            settings,
        })
    }

    /// Opens one connection (not pooled) and spawns its driver.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, DbError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.connect_error(&e))?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// A connection failure described with the TLS settings and, where the cause is a
    /// known one, what to change.
    pub fn connect_error(&self, e: &tokio_postgres::Error) -> DbError {
        let mut cause = describe(e);
        let mut transient = is_transient(e);
        let refused_plain = e.as_db_error().is_some_and(|d| {
            d.code() == &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                && d.message().contains("no encryption")
        });
        if refused_plain && self.settings.mode == SslMode::Disable {
            cause.push_str(
                "; the server accepts only TLS connections: set sslmode=require or verify-full",
            );
        } else if cause.contains("TLS handshake") || cause.contains("certificate") {
            // A refused certificate is refused again; only a new setting helps.
            transient = false;
            cause.push_str(
                "; check sslrootcert (the CA that signed the server's certificate) and, for \
                 verify-full, that the host in DATABASE_URL is a name in the certificate",
            );
        } else if cause.contains("server does not support TLS") {
            transient = false;
            cause.push_str("; the server has TLS off: enable it, or use sslmode=prefer or disable");
        }
        DbError::FirstConnect {
            settings: self.settings.describe(),
            cause,
            transient,
        }
    }
}

/// Builds a pool of at most `max_size` connections (deadpool's default, 4 × cores, is more
/// than a worker needs and multiplies with replicas against `max_connections`).
pub fn pool(url: &str, max_size: usize) -> Result<Pool, DbError> {
    let target = Target::parse(url)?;
    let manager = Manager::from_config(
        target.config,
        target.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| DbError::Pool(e.to_string()))
}

/// Creates the database named in `url` if it does not exist, connecting to the server's
/// `postgres` database to do so. This lets a bare `cargo run` work on a fresh machine.
///
/// With several hosts, the `postgres` database is reached the same way as the pool reaches
/// its own (`target_session_attrs` included), so it is created on the primary. This is also
/// the first connection a process makes, so its error names the TLS settings.
pub async fn ensure_database(url: &str) -> Result<(), DbError> {
    let mut target = Target::parse(url)?;
    let Some(name) = target.config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    target.config.dbname("postgres");
    let client = target.connect().await?;
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
