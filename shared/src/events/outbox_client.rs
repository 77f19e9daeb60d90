//! The clients the outbox insert runs on, and which of them keep its statement prepared.
//!
//! The insert is one statement with a CTE (the person's sequence) and JSON functions. Run as
//! text, PostgreSQL parses, analyses and plans it again for every event — on the send path,
//! for every first message. A pooled connection (`deadpool_postgres`) keeps it prepared
//! once per connection; plain `tokio_postgres` clients (tests, tools) run it as text.

use std::future::Future;

use tokio_postgres::types::ToSql;

/// Runs the outbox statement on a connection or in a transaction, prepared once per pooled
/// connection where the client can cache it.
pub trait OutboxClient: Sync {
    /// Executes `sql` with `params`; returns the rows affected.
    fn execute_outbox(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, tokio_postgres::Error>> + Send;
}

impl OutboxClient for tokio_postgres::Client {
    fn execute_outbox(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, tokio_postgres::Error>> + Send {
        self.execute(sql, params)
    }
}

impl OutboxClient for tokio_postgres::Transaction<'_> {
    fn execute_outbox(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64, tokio_postgres::Error>> + Send {
        self.execute(sql, params)
    }
}

impl OutboxClient for deadpool_postgres::Client {
    async fn execute_outbox(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.execute(&statement, params).await
    }
}

impl OutboxClient for deadpool_postgres::Transaction<'_> {
    async fn execute_outbox(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.prepare_cached(sql).await?;
        self.execute(&statement, params).await
    }
}
