//! The registry's SQL: rows of `apps` and `pages`, and the version every replica polls.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::model::{App, NewApp, Page, PageOrigin};

const APP_COLUMNS: &str =
    "app_id, app_secret_env, login_app_id, client_token_env, created_at, updated_at";
const PAGE_COLUMNS: &str = "page_id, app_id, name, first_message, rate_limit, source, in_file, \
                            created_at, updated_at";

fn app(r: &Row) -> App {
    App {
        app_id: r.get(0),
        app_secret_env: r.get(1),
        login_app_id: r.get(2),
        client_token_env: r.get(3),
        created_at: r.get(4),
        updated_at: r.get(5),
    }
}

fn page(r: &Row) -> Page {
    Page {
        page_id: r.get(0),
        app_id: r.get(1),
        name: r.get(2),
        first_message: r.get(3),
        rate_limit: r
            .get::<_, Option<i32>>(4)
            .map(|n| u32::try_from(n).unwrap_or(0)),
        // The CHECK allows only these two; an unknown value would be a newer version's.
        source: PageOrigin::parse(r.get(5)).unwrap_or(PageOrigin::Api),
        in_pages_file: r.get(6),
        created_at: r.get(7),
        updated_at: r.get(8),
    }
}

pub use lc_shared::registry::version;

/// Inserts an app; `false` when the id exists.
pub async fn insert_app(c: &impl GenericClient, a: &NewApp) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "INSERT INTO apps (app_id, app_secret_env, login_app_id, client_token_env) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (app_id) DO NOTHING",
            &[
                &a.app_id,
                &a.app_secret_env,
                &a.login_app_id,
                &a.client_token_env,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// One app.
pub async fn app_by_id(
    c: &impl GenericClient,
    app_id: &str,
) -> Result<Option<App>, tokio_postgres::Error> {
    let sql = format!("SELECT {APP_COLUMNS} FROM apps WHERE app_id = $1");
    Ok(c.query_opt(&sql, &[&app_id]).await?.as_ref().map(app))
}

/// Every app, by id.
pub async fn apps(c: &impl GenericClient) -> Result<Vec<App>, tokio_postgres::Error> {
    let sql = format!("SELECT {APP_COLUMNS} FROM apps ORDER BY app_id");
    Ok(c.query(&sql, &[]).await?.iter().map(app).collect())
}

/// A page row to insert.
#[derive(Debug, Clone)]
pub struct PageRow<'a> {
    /// The page.
    pub page_id: &'a str,
    /// Its app.
    pub app_id: Option<&'a str>,
    /// Its name.
    pub name: Option<&'a str>,
    /// The first message JSON.
    pub first_message: &'a serde_json::Value,
    /// Its own rate limit.
    pub rate_limit: Option<i32>,
}

/// Inserts a page created through the API; `false` when the id exists.
pub async fn insert_page(
    c: &impl GenericClient,
    p: &PageRow<'_>,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "INSERT INTO pages (page_id, app_id, name, first_message, rate_limit, source) \
             VALUES ($1, $2, $3, $4, $5, 'api') ON CONFLICT (page_id) DO NOTHING",
            &[
                &p.page_id,
                &p.app_id,
                &p.name,
                &p.first_message,
                &p.rate_limit,
            ],
        )
        .await?;
    Ok(n == 1)
}

/// One page.
pub async fn page_by_id(
    c: &impl GenericClient,
    page_id: &str,
) -> Result<Option<Page>, tokio_postgres::Error> {
    let sql = format!("SELECT {PAGE_COLUMNS} FROM pages WHERE page_id = $1");
    Ok(c.query_opt(&sql, &[&page_id]).await?.as_ref().map(page))
}

/// Every page, by id.
pub async fn pages(c: &impl GenericClient) -> Result<Vec<Page>, tokio_postgres::Error> {
    let sql = format!("SELECT {PAGE_COLUMNS} FROM pages ORDER BY page_id");
    Ok(c.query(&sql, &[]).await?.iter().map(page).collect())
}

/// Replaces what `Some` fields give (`rate_limit`/`name`: `Some(None)` clears); returns
/// whether the page exists.
pub async fn update_page(
    c: &impl GenericClient,
    page_id: &str,
    first_message: Option<&serde_json::Value>,
    rate_limit: Option<Option<i32>>,
    name: Option<Option<&str>>,
) -> Result<bool, tokio_postgres::Error> {
    let n = c
        .execute(
            "UPDATE pages SET \
                 first_message = COALESCE($2, first_message), \
                 rate_limit = CASE WHEN $3 THEN $4 ELSE rate_limit END, \
                 name = CASE WHEN $5 THEN $6 ELSE name END, \
                 updated_at = now() \
             WHERE page_id = $1",
            &[
                &page_id,
                &first_message,
                &rate_limit.is_some(),
                &rate_limit.flatten(),
                &name.is_some(),
                &name.flatten(),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Deletes a page with its stored token and shared state; returns whether it existed.
pub async fn delete_page(
    c: &impl GenericClient,
    page_id: &str,
) -> Result<bool, tokio_postgres::Error> {
    c.execute("DELETE FROM page_tokens WHERE page_id = $1", &[&page_id])
        .await?;
    c.execute("DELETE FROM page_state WHERE page_id = $1", &[&page_id])
        .await?;
    let n = c
        .execute("DELETE FROM pages WHERE page_id = $1", &[&page_id])
        .await?;
    Ok(n == 1)
}
