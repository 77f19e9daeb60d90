//! Reading and seeding the test's database: the rows tests assert on, rows written as the
//! services would have written them (a backlog, a state before any worker runs), and the
//! scheduler's store driven by hand (claims and leases, for crash-window tests).

use std::time::Duration;

use lc_worker::scheduler::store;
use time::OffsetDateTime;

use super::PAGE;

/// The state of one opt-in row of [`PAGE`].
pub async fn optin_state(sql: &tokio_postgres::Client, login_id: &str) -> Option<String> {
    sql.query_opt(
        "SELECT state FROM optins WHERE page_id = $1 AND login_id = $2",
        &[&PAGE, &login_id],
    )
    .await
    .expect("query")
    .map(|r| r.get(0))
}

/// State and `replied_at` of an opt-in of [`PAGE`] (the row must exist).
pub async fn optin_replied(
    sql: &tokio_postgres::Client,
    login_id: &str,
) -> (String, Option<OffsetDateTime>) {
    let row = sql
        .query_one(
            "SELECT state, replied_at FROM optins WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("opt-in row");
    (row.get(0), row.get(1))
}

/// PSID, `linked_at` and `first_reply_mid` of a link of [`PAGE`] (the row must exist).
pub async fn link_of(
    sql: &tokio_postgres::Client,
    login_id: &str,
) -> (String, OffsetDateTime, Option<String>) {
    let row = sql
        .query_one(
            "SELECT psid, linked_at, first_reply_mid FROM links WHERE page_id = $1 AND login_id = $2",
            &[&PAGE, &login_id],
        )
        .await
        .expect("link row");
    (row.get(0), row.get(1), row.get(2))
}

/// Runs a `SELECT count(*)`.
pub async fn count(sql: &tokio_postgres::Client, query: &str) -> i64 {
    sql.query_one(query, &[]).await.expect("count").get(0)
}

/// Inserts an opt-in row directly (as the scheduler would have recorded it), for tests that
/// set up a backlog or a state before any worker runs. Its deadline is `at` + 24 h.
pub async fn insert_optin(
    sql: &tokio_postgres::Client,
    page_id: &str,
    login_id: &str,
    at: OffsetDateTime,
    state: &str,
) {
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         VALUES ($1, $2, $3, $3::timestamptz + interval '24 hours', $3, $4, $3)",
        &[&page_id, &login_id, &at, &state],
    )
    .await
    .expect("insert opt-in");
}

/// Inserts an opt-in as the scheduler leaves it after sending: `sent`, with its message id
/// (`m_first_message`), sent a second after `at`, in one attempt. Its deadline is `at` + 24 h.
pub async fn insert_sent_optin(
    sql: &tokio_postgres::Client,
    page_id: &str,
    login_id: &str,
    at: OffsetDateTime,
) {
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
         next_attempt_at, message_id, sent_at, attempts) \
         VALUES ($1, $2, $3, $3::timestamptz + interval '24 hours', $3, 'sent', $3, \
                 'm_first_message', $4, 1)",
        &[&page_id, &login_id, &at, &(at + Duration::from_secs(1))],
    )
    .await
    .expect("insert sent opt-in");
}

/// Claims every due row for `owner` (at most 10, no safety margin), as a worker's dispatcher
/// would. Every page with opt-ins gets an unlimited send budget first: these tests are about
/// claims and leases, not rates.
pub async fn claim(
    client: &mut deadpool_postgres::Client,
    owner: &str,
    lease: Duration,
) -> Vec<store::claim::Claimed> {
    client
        .execute(
            "INSERT INTO page_state (page_id, rate_limit) SELECT DISTINCT page_id, 0 FROM optins \
             ON CONFLICT (page_id) DO NOTHING",
            &[],
        )
        .await
        .expect("page state");
    store::claim::claim_due(client, &store::claim::ClaimRequest::new(owner, lease, 10))
        .await
        .expect("claim")
}

/// Ends every lease of a row being sent, as if its worker had stalled past it.
pub async fn expire_leases(sql: &tokio_postgres::Client) {
    sql.execute(
        "UPDATE optins SET lease_expires_at = now() - interval '1 second' WHERE state = 'sending'",
        &[],
    )
    .await
    .expect("expire leases");
}
