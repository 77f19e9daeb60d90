//! What every process reads of the page registry (tables `apps`, `pages`,
//! `registry_version`; written by the worker's `registry` module): the version every replica
//! polls, and the app bindings ingest verifies signatures with.
//!
//! The polling itself stays with each reader (the scheduler's page reload, ingest's
//! bindings): both poll [`version`] every [`POLL_EVERY`] and read again only when it moved.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::GenericClient;

/// How often readers look at the registry's version: half a second, so that a change is in
/// use on every replica within a second even with a slow read (one row of one table per
/// poll: cheap).
pub const POLL_EVERY: Duration = Duration::from_millis(500);

/// The registry's version: any change of apps, pages or stored tokens increases it.
pub async fn version(c: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    Ok(c.query_one("SELECT version FROM registry_version", &[])
        .await?
        .get(0))
}

/// Which app each page belongs to, and where each app's secret is: what ingest needs to
/// refuse a delivery signed by one client's app for another client's page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bindings {
    /// App id → the name of the environment variable holding its app secret (never the
    /// secret itself).
    pub app_secret_env: HashMap<String, String>,
    /// Page id → its app id, for every page bound to an app (pages of the deployment's own
    /// app, `app_id` NULL, are not listed).
    pub page_app: HashMap<String, String>,
}

/// Reads the bindings.
pub async fn bindings(c: &impl GenericClient) -> Result<Bindings, tokio_postgres::Error> {
    let app_secret_env = c
        .query("SELECT app_id, app_secret_env FROM apps", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let page_app = c
        .query(
            "SELECT page_id, app_id FROM pages WHERE app_id IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Bindings {
        app_secret_env,
        page_app,
    })
}
