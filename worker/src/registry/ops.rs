//! The registry's operations, called by the admin API and by the `loginconnect` CLI alike.
//!
//! Inputs are checked here (so both get the same rules and the same messages), and every
//! write is logged with `actor` — the admin token's name, or `cli` — never with a secret.

use deadpool_postgres::{Client, GenericClient};
use lc_meta::secret::Secret;

use super::RegistryError;
use super::model::{
    App, NewApp, NewPage, Page, PageCondition, PageStatus, PageUpdate, PauseInfo, TokenOrigin,
};
use super::store::{self, PageRow};
use crate::scheduler::store::pages::{self as page_state, PauseReason};
use crate::scheduler::tokens::TokenKeys;

/// Longest id accepted (Meta's ids are about 16 digits).
const MAX_ID_LEN: usize = 32;

fn check_id(field: &str, value: &str) -> Result<(), RegistryError> {
    if value.is_empty() || value.len() > MAX_ID_LEN || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RegistryError::Invalid(format!(
            "`{field}` must be a Meta id: 1 to {MAX_ID_LEN} digits, as a string"
        )));
    }
    Ok(())
}

fn check_env_name(field: &str, value: &str) -> Result<(), RegistryError> {
    let mut bytes = value.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(RegistryError::Invalid(format!(
            "`{field}` must be the *name* of an environment variable (letters, digits, `_`), \
             not the secret itself; export the secret under that name on every replica"
        )));
    }
    Ok(())
}

fn check_rate(rate: Option<u32>) -> Result<Option<i32>, RegistryError> {
    rate.map(|r| {
        i32::try_from(r).map_err(|_| {
            RegistryError::Invalid(
                "`rate_limit` is too large; Meta allows about 300 calls per second per page".into(),
            )
        })
    })
    .transpose()
}

fn message_json(
    page_id: &str,
    m: &lc_meta::pages::FirstMessage,
) -> Result<serde_json::Value, RegistryError> {
    m.validate(&format!("page \"{page_id}\""))
        .map_err(|problems| {
            RegistryError::Invalid(
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
    serde_json::to_value(m).map_err(|e| RegistryError::Invalid(format!("first_message: {e}")))
}

fn unknown_page(page_id: &str) -> RegistryError {
    RegistryError::NotFound(format!(
        "page {page_id} is not in the registry; create it first (POST /pages or \
         `loginconnect pages create`), or list the pages (GET /pages)"
    ))
}

/// Creates an app.
pub async fn create_app(c: &Client, actor: &str, new: &NewApp) -> Result<App, RegistryError> {
    check_id("app_id", &new.app_id)?;
    check_env_name("app_secret_env", &new.app_secret_env)?;
    if let Some(id) = &new.login_app_id {
        check_id("login_app_id", id)?;
    }
    if let Some(var) = &new.client_token_env {
        check_env_name("client_token_env", var)?;
    }
    if !store::insert_app(c, new).await? {
        return Err(RegistryError::Conflict(format!(
            "app {} exists already; read it with GET /apps/{}",
            new.app_id, new.app_id
        )));
    }
    tracing::info!(actor, app_id = %new.app_id, "registry: app created");
    app(c, &new.app_id).await
}

/// One app.
pub async fn app(c: &Client, app_id: &str) -> Result<App, RegistryError> {
    store::app_by_id(c, app_id).await?.ok_or_else(|| {
        RegistryError::NotFound(format!(
            "app {app_id} is unknown; create it with POST /apps"
        ))
    })
}

/// Every app.
pub async fn apps(c: &Client) -> Result<Vec<App>, RegistryError> {
    Ok(store::apps(c).await?)
}

/// Creates a page (no token yet: set one with [`set_token`] before subscribing the page).
pub async fn create_page(c: &Client, actor: &str, new: &NewPage) -> Result<Page, RegistryError> {
    check_id("page_id", &new.page_id)?;
    let message = message_json(&new.page_id, &new.first_message)?;
    let rate = check_rate(new.rate_limit)?;
    if let Some(app_id) = &new.app_id {
        check_id("app_id", app_id)?;
        if store::app_by_id(c, app_id).await?.is_none() {
            return Err(RegistryError::Invalid(format!(
                "`app_id` {app_id} is unknown; create the app first (POST /apps)"
            )));
        }
    }
    let row = PageRow {
        page_id: &new.page_id,
        app_id: new.app_id.as_deref(),
        name: new.name.as_deref(),
        first_message: &message,
        rate_limit: rate,
    };
    if !store::insert_page(c, &row).await? {
        return Err(RegistryError::Conflict(format!(
            "page {} exists already; change it with PATCH /pages/{}",
            new.page_id, new.page_id
        )));
    }
    tracing::info!(actor, page_id = %new.page_id, "registry: page created");
    page(c, &new.page_id).await
}

/// One page.
pub async fn page(c: &impl GenericClient, page_id: &str) -> Result<Page, RegistryError> {
    store::page_by_id(c, page_id)
        .await?
        .ok_or_else(|| unknown_page(page_id))
}

/// Every page.
pub async fn pages(c: &Client) -> Result<Vec<Page>, RegistryError> {
    Ok(store::pages(c).await?)
}

/// Changes a page's first message, rate limit or name; every replica uses the change
/// within a second.
pub async fn update_page(
    c: &Client,
    actor: &str,
    page_id: &str,
    update: &PageUpdate,
) -> Result<Page, RegistryError> {
    let message = match &update.first_message {
        Some(m) => Some(message_json(page_id, m)?),
        None => None,
    };
    let rate = match update.rate_limit {
        Some(r) => Some(check_rate(r)?),
        None => None,
    };
    let name = update.name.as_ref().map(|n| n.as_deref());
    if !store::update_page(c, page_id, message.as_ref(), rate, name).await? {
        return Err(unknown_page(page_id));
    }
    tracing::info!(
        actor,
        page_id,
        first_message = message.is_some(),
        rate_limit = ?rate,
        "registry: page changed"
    );
    page(c, page_id).await
}

/// Stores a new token for a page (encrypted with the first key) and lifts a token pause;
/// returns the id of the key used. The token is never returned or logged.
pub async fn set_token(
    c: &mut Client,
    keys: &TokenKeys,
    actor: &str,
    page_id: &str,
    token: &Secret,
) -> Result<String, RegistryError> {
    if token.expose().trim().is_empty() {
        return Err(RegistryError::Invalid(
            "the token is empty; give the page access token".into(),
        ));
    }
    page(&*c, page_id).await?;
    let sealed = keys.seal(page_id, &Secret::new(token.expose().trim()))?;
    page_state::store_token(c, &sealed, true).await?;
    tracing::info!(actor, page_id, key_id = %sealed.key_id, "registry: page token replaced");
    Ok(sealed.key_id)
}

/// Pauses a page on every replica until a resume (an operator pause).
pub async fn pause(
    c: &mut Client,
    actor: &str,
    page_id: &str,
) -> Result<PageStatus, RegistryError> {
    let p = page(&*c, page_id).await?;
    // The page may have no state row yet (created, no scheduler synced it): a provisional
    // one, which the next sync gives the right rate.
    let rate = i32::try_from(p.rate_limit.unwrap_or(1)).unwrap_or(i32::MAX);
    c.execute(
        "INSERT INTO page_state (page_id, rate_limit) VALUES ($1, $2) \
         ON CONFLICT (page_id) DO NOTHING",
        &[&page_id, &rate],
    )
    .await?;
    let paused_now = page_state::pause(
        c,
        page_id,
        PauseReason::Operator,
        None,
        &format!("paused by {actor}"),
    )
    .await?;
    tracing::info!(
        actor,
        page_id,
        paused_now,
        "registry: page paused by an operator"
    );
    status(&*c, page_id).await
}

/// Lifts a page's pause and throttle on every replica.
pub async fn resume(
    c: &mut Client,
    actor: &str,
    page_id: &str,
) -> Result<PageStatus, RegistryError> {
    let known = store::page_by_id(&*c, page_id).await?.is_some();
    let had_state = page_state::resume(c, page_id).await?;
    if !known && !had_state {
        return Err(unknown_page(page_id));
    }
    tracing::info!(actor, page_id, "registry: page resumed");
    status(&*c, page_id).await
}

/// Deletes a page, its stored token and its shared state. A page still in the pages file is
/// refused: the next import would bring it back.
pub async fn delete_page(c: &mut Client, actor: &str, page_id: &str) -> Result<(), RegistryError> {
    let tx = c.transaction().await?;
    let p = page(&tx, page_id).await?;
    if p.in_pages_file {
        return Err(RegistryError::Conflict(format!(
            "page {page_id} is in the pages file; remove it from PAGES_FILE first (the next \
             import would create it again), then delete it"
        )));
    }
    store::delete_page(&tx, page_id).await?;
    tx.commit().await?;
    tracing::info!(actor, page_id, "registry: page deleted");
    Ok(())
}

const STATUS_SQL: &str = "SELECT page_id, s.paused_reason, s.paused_since, s.paused_detail, \
         s.unsubscribed_since, CASE WHEN s.throttled_until > now() THEN s.throttled_until END, \
         s.rate_limit, s.rate_factor, t.page_id IS NOT NULL, COALESCE(p.in_file, false) \
     FROM pages p FULL JOIN page_state s USING (page_id) LEFT JOIN page_tokens t USING (page_id)";

fn status_of(r: &tokio_postgres::Row) -> PageStatus {
    let reason: Option<String> = r.get(1);
    let paused = reason.map(|reason| PauseInfo {
        reason,
        since: r.get(2),
        detail: r.get(3),
    });
    let unsubscribed_since: Option<time::OffsetDateTime> = r.get(4);
    let throttled_until: Option<time::OffsetDateTime> = r.get(5);
    let stored: bool = r.get(8);
    let in_pages_file: bool = r.get(9);
    let token = match (stored, in_pages_file) {
        (true, _) => TokenOrigin::Stored,
        (false, true) => TokenOrigin::PagesFile,
        (false, false) => TokenOrigin::Missing,
    };
    let state = if paused.is_some() {
        PageCondition::Paused
    } else if unsubscribed_since.is_some() {
        PageCondition::Unsubscribed
    } else if throttled_until.is_some() {
        PageCondition::Throttled
    } else if token == TokenOrigin::Missing {
        PageCondition::NoToken
    } else {
        PageCondition::Active
    };
    PageStatus {
        page_id: r.get(0),
        state,
        paused,
        unsubscribed_since,
        throttled_until,
        rate_limit: r.get(6),
        rate_factor: r.get(7),
        token,
        in_pages_file,
    }
}

/// One page's status.
pub async fn status(c: &Client, page_id: &str) -> Result<PageStatus, RegistryError> {
    let sql = format!("{STATUS_SQL} WHERE page_id = $1");
    c.query_opt(&sql, &[&page_id])
        .await?
        .as_ref()
        .map(status_of)
        .ok_or_else(|| unknown_page(page_id))
}

/// Every page's status, by page id (pages of the registry, and pages a scheduler recorded).
pub async fn statuses(c: &Client) -> Result<Vec<PageStatus>, RegistryError> {
    let sql = format!("{STATUS_SQL} ORDER BY page_id");
    Ok(c.query(&sql, &[]).await?.iter().map(status_of).collect())
}
