//! Refusing a connection pooler that does not give each connection its own server session.
//!
//! loginconnect needs session semantics from every connection: migrations and the watchdog
//! hold *session* advisory locks, the outbox relay `LISTEN`s on a connection of its own, and
//! tokio-postgres prepares named statements that must still exist at the next statement.
//! PgBouncer in session mode keeps those (a client keeps its server session until it
//! disconnects); in transaction or statement mode a connection's statements run on whichever
//! server session is free, so locks land on sessions nobody holds, notifications go nowhere
//! and prepared statements vanish (before PgBouncer 1.21). Nothing fails at once: it fails
//! later, under load, and silently. So the start-up checks it and refuses.
//!
//! The check: connection A reads its backend pid; connection B then opens a transaction and
//! reads its own; A reads its pid again. Without a pooler, or in session mode, A keeps one
//! server session, so both of A's pids match and B's differs. In transaction mode A gave its
//! session back after its first statement: PgBouncer hands out the most recently released
//! server first, so B's transaction usually pins A's session (same pid: refused); otherwise
//! A's second statement runs on another session (different pid: refused) or waits for one
//! (refused after a bound). Statement mode refuses B's `BEGIN` itself. Only simple-query
//! statements are used, so the check also works where named prepared statements do not.

use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use super::{DbError, Target, describe};

/// How long A's second statement may wait for a server session while B holds a transaction
/// (a session of A's own answers at once).
const SECOND_STATEMENT_BOUND: Duration = Duration::from_secs(10);

/// Fails with [`DbError::TransactionPooler`] when `url` leads to a pooler in transaction or
/// statement mode (see the module doc for how it tells). Opens two short connections.
pub async fn refuse_transaction_pooling(url: &str) -> Result<(), DbError> {
    let target = Target::parse(url)?;
    let a = target.connect().await?;
    let b = target.connect().await?;
    let first = backend_pid(&a).await?;
    if let Err(e) = b.batch_execute("BEGIN").await {
        // PgBouncer in statement mode refuses transactions outright.
        return Err(DbError::TransactionPooler {
            evidence: format!("BEGIN was refused: {}", describe(&e)),
        });
    }
    let pinned = backend_pid(&b).await?;
    let evidence = if pinned == first {
        Some(format!(
            "a second connection's transaction ran on the server session (backend pid {first}) the first connection had just used"
        ))
    } else {
        match tokio::time::timeout(SECOND_STATEMENT_BOUND, backend_pid(&a)).await {
            Ok(Ok(second)) if second == first => None,
            Ok(Ok(second)) => Some(format!(
                "two statements of one connection ran on different server sessions (backend pids {first} and {second})"
            )),
            Ok(Err(e)) => return Err(e),
            Err(_) => Some(format!(
                "a connection's second statement waited over {SECOND_STATEMENT_BOUND:?} for a server session while another connection held a transaction"
            )),
        }
    };
    // B's transaction read nothing and wrote nothing; closing the connection ends it too.
    let _ = b.batch_execute("ROLLBACK").await;
    match evidence {
        Some(evidence) => Err(DbError::TransactionPooler { evidence }),
        None => Ok(()),
    }
}

/// `pg_backend_pid()` through the simple-query protocol (no named prepared statement).
async fn backend_pid(client: &Client) -> Result<i32, DbError> {
    let messages = client.simple_query("SELECT pg_backend_pid()").await?;
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|pid| pid.parse().ok()),
            _ => None,
        })
        .ok_or_else(|| DbError::Pool("SELECT pg_backend_pid() returned no pid".into()))
}
