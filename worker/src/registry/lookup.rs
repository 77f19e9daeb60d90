//! Opt-in and link look-ups (reads only; the ids looked up are never logged).

use deadpool_postgres::Client;
use serde::Serialize;
use time::OffsetDateTime;
use tokio_postgres::Row;

use super::RegistryError;

/// An opt-in as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Optin {
    /// The page.
    pub page_id: String,
    /// The person's login_id.
    pub login_id: String,
    /// The window number (a new opt-in after a closed window starts the next).
    pub cycle: i32,
    /// `webhook` or `login_event`.
    pub source: String,
    /// `pending`, `sending`, `sent`, `replied`, `failed` or `expired`.
    pub state: String,
    /// When the person opted in.
    #[serde(with = "time::serde::rfc3339")]
    pub opted_in_at: OffsetDateTime,
    /// The 24-hour deadline.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// Send API attempts so far.
    pub attempts: i32,
    /// The Send API message id, once sent.
    pub message_id: Option<String>,
    /// When it was sent.
    #[serde(with = "time::serde::rfc3339::option")]
    pub sent_at: Option<OffsetDateTime>,
    /// Why it failed, if it did.
    pub failure_reason: Option<String>,
    /// When the person first replied.
    #[serde(with = "time::serde::rfc3339::option")]
    pub replied_at: Option<OffsetDateTime>,
}

const OPTIN_SQL: &str = "SELECT page_id, login_id, cycle, source, state, opted_in_at, deadline, \
     attempts, message_id, sent_at, failure_reason, replied_at FROM optins";

fn optin(r: &Row) -> Optin {
    Optin {
        page_id: r.get(0),
        login_id: r.get(1),
        cycle: r.get(2),
        source: r.get(3),
        state: r.get(4),
        opted_in_at: r.get(5),
        deadline: r.get(6),
        attempts: r.get(7),
        message_id: r.get(8),
        sent_at: r.get(9),
        failure_reason: r.get(10),
        replied_at: r.get(11),
    }
}

/// The opt-in of `login_id` on `page_id`.
pub async fn optin_of(
    c: &Client,
    page_id: &str,
    login_id: &str,
) -> Result<Option<Optin>, RegistryError> {
    let sql = format!("{OPTIN_SQL} WHERE page_id = $1 AND login_id = $2");
    Ok(c.query_opt(&sql, &[&page_id, &login_id])
        .await?
        .as_ref()
        .map(optin))
}

/// The opt-ins of `login_id` on every page (an opt-in's id is its login_id per page).
pub async fn optins_of(c: &Client, login_id: &str) -> Result<Vec<Optin>, RegistryError> {
    let sql = format!("{OPTIN_SQL} WHERE login_id = $1 ORDER BY page_id");
    Ok(c.query(&sql, &[&login_id])
        .await?
        .iter()
        .map(optin)
        .collect())
}

/// An identity link login_id → PSID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    /// The page.
    pub page_id: String,
    /// The person's login_id.
    pub login_id: String,
    /// Their page-scoped id.
    pub psid: String,
    /// When the link was made.
    #[serde(with = "time::serde::rfc3339")]
    pub linked_at: OffsetDateTime,
    /// The reply that made it.
    pub first_reply_mid: Option<String>,
}

/// What a link is looked up by.
#[derive(Debug, Clone, Copy)]
pub enum LinkKey<'a> {
    /// The login_id.
    LoginId(&'a str),
    /// The page-scoped id.
    Psid(&'a str),
}

/// The links of `page_id` matching `key`.
pub async fn links(
    c: &Client,
    page_id: &str,
    key: LinkKey<'_>,
) -> Result<Vec<Link>, RegistryError> {
    let (column, value) = match key {
        LinkKey::LoginId(v) => ("login_id", v),
        LinkKey::Psid(v) => ("psid", v),
    };
    let sql = format!(
        "SELECT page_id, login_id, psid, linked_at, first_reply_mid FROM links \
         WHERE page_id = $1 AND {column} = $2 ORDER BY linked_at"
    );
    Ok(c.query(&sql, &[&page_id, &value])
        .await?
        .iter()
        .map(|r| Link {
            page_id: r.get(0),
            login_id: r.get(1),
            psid: r.get(2),
            linked_at: r.get(3),
            first_reply_mid: r.get(4),
        })
        .collect())
}
