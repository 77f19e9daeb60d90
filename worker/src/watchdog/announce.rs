//! The subscription state of each page in PostgreSQL, and its announcement: a round that
//! finds a page's subscription incomplete writes `subscription.lost` once per loss (the loss
//! is kept in `page_state.unsubscribed_since`, so later rounds that still find it missing
//! write nothing), and the first round that finds it complete again writes
//! `subscription.restored`. State and event are written in one transaction (the outbox).

use deadpool_postgres::Pool;
use lc_shared::events::{
    OperationalEvent, SubscriptionLost, SubscriptionRestored, insert_operational,
};

use super::{PageCheck, RoundReport};

/// `source` of the watchdog's events.
pub const EVENT_SOURCE: &str = "/loginconnect/watchdog";

/// Errors of recording a round; the next round records its own findings again.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// No database connection could be taken from the pool.
    #[error("cannot get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {}", lc_shared::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// What recording one round announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announced {
    /// Pages whose loss was announced now (`subscription.lost`).
    pub lost: Vec<String>,
    /// Pages whose return was announced now (`subscription.restored`).
    pub restored: Vec<String>,
}

/// Records what a round found for each page and announces the changes. A page whose check
/// failed (Graph error on the read) says nothing about its subscription and is left as it
/// was; a page without a state row (not known to the scheduler yet) gets one on its first
/// loss.
pub async fn record_round(pool: &Pool, report: &RoundReport) -> Result<Announced, AnnounceError> {
    let mut client = pool.get().await?;
    let mut announced = Announced::default();
    for (page_id, check) in &report.pages {
        let missing = match check {
            PageCheck::Healthy => None,
            PageCheck::Resubscribed { missing, .. } | PageCheck::Missing { missing, .. } => {
                Some(missing)
            }
            PageCheck::Failed(_) | PageCheck::NoApp => continue,
        };
        let tx = client.transaction().await?;
        // Each statement changes (and locks) the row only when the state really changes,
        // so a healthy page costs no lock (claims lock page rows too) and a loss or a return
        // is announced once, also if another replica took over the watchdog mid-round.
        match missing {
            Some(missing) => {
                let row = tx
                    .query_opt(
                        "INSERT INTO page_state (page_id, rate_limit, unsubscribed_since) \
                         VALUES ($1, 0, now()) ON CONFLICT (page_id) DO UPDATE \
                         SET unsubscribed_since = now(), updated_at = now() \
                         WHERE page_state.unsubscribed_since IS NULL \
                         RETURNING unsubscribed_since",
                        &[page_id],
                    )
                    .await?;
                if let Some(row) = row {
                    let event = OperationalEvent::SubscriptionLost(SubscriptionLost {
                        page_id: page_id.clone(),
                        app_id: String::new(),
                        missing: missing.clone(),
                        since: row.get(0),
                    });
                    insert_operational(&*tx, &event, EVENT_SOURCE).await?;
                    announced.lost.push(page_id.clone());
                }
            }
            None => {
                let row = tx
                    .query_opt(
                        "WITH lost AS (SELECT page_id, unsubscribed_since FROM page_state \
                             WHERE page_id = $1 AND unsubscribed_since IS NOT NULL FOR UPDATE) \
                         UPDATE page_state p SET unsubscribed_since = NULL, updated_at = now() \
                         FROM lost WHERE p.page_id = lost.page_id \
                         RETURNING lost.unsubscribed_since, now()",
                        &[page_id],
                    )
                    .await?;
                if let Some(row) = row {
                    let event = OperationalEvent::SubscriptionRestored(SubscriptionRestored {
                        page_id: page_id.clone(),
                        app_id: String::new(),
                        lost_since: row.get(0),
                        restored_at: row.get(1),
                    });
                    insert_operational(&*tx, &event, EVENT_SOURCE).await?;
                    announced.restored.push(page_id.clone());
                }
            }
        }
        tx.commit().await?;
    }
    Ok(announced)
}
