//! One replica's pages: the registry's pages with their tokens, as the scheduler and the
//! watchdog use them.
//!
//! A page's token is its stored token (encrypted in `page_tokens`) if it has one, else the
//! token this replica's pages file gives it; a page with neither is left out (no replica
//! can send for it) and logged. The app secret used for `appsecret_proof` is the file's, or
//! for a page bound to an app, the variable the app names.

use std::collections::HashMap;

use deadpool_postgres::Client;
use lc_meta::pages::{FirstMessage, PageConfig, PagesConfig};
use lc_meta::secret::Secret;

use super::RegistryError;
use super::store;
use crate::scheduler::store::pages::load_tokens;
use crate::scheduler::tokens::TokenKeys;

/// A replica's pages and what else the registry says about them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegistryView {
    /// The pages this replica can send for.
    pub config: PagesConfig,
    /// Each page's own rate limit (absent: `PAGE_RATE_LIMIT`).
    pub rate_limits: HashMap<String, u32>,
    /// Pages of the registry left out for want of a token (or with an unreadable row).
    pub left_out: Vec<String>,
}

/// Builds the view from the registry, the stored tokens and `file` (this replica's pages
/// file, for the tokens and app secrets it gives). `env` resolves apps' secret variables.
pub async fn build(
    client: &Client,
    file: Option<&PagesConfig>,
    keys: &TokenKeys,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<RegistryView, RegistryError> {
    let pages = store::pages(client).await?;
    let apps: HashMap<String, String> = store::apps(client)
        .await?
        .into_iter()
        .map(|a| (a.app_id, a.app_secret_env))
        .collect();
    let mut stored: HashMap<String, Secret> = HashMap::new();
    for row in load_tokens(client).await? {
        match keys.open(&row) {
            Ok(token) => {
                stored.insert(row.page_id.clone(), token);
            }
            Err(e) => {
                tracing::error!(page_id = %row.page_id, error = %e, "cannot use the stored token; using the pages file's, if it has one")
            }
        }
    }
    let mut view = RegistryView::default();
    for page in pages {
        let from_file = file.and_then(|f| f.get(&page.page_id));
        let first_message: FirstMessage = match serde_json::from_value(page.first_message) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(page_id = %page.page_id, error = %e, "the registry's first message of the page cannot be read by this version; page left out");
                view.left_out.push(page.page_id);
                continue;
            }
        };
        let token = stored
            .remove(&page.page_id)
            .or_else(|| from_file.map(|p| p.access_token.clone()));
        let Some(access_token) = token else {
            view.left_out.push(page.page_id);
            continue;
        };
        let app_secret = from_file.and_then(|p| p.app_secret.clone()).or_else(|| {
            page.app_id
                .as_ref()
                .and_then(|app| apps.get(app))
                .and_then(|var| env(var))
                .map(|v| Secret::new(v.trim()))
        });
        if let Some(rate) = page.rate_limit {
            view.rate_limits.insert(page.page_id.clone(), rate);
        }
        view.config.pages.push(PageConfig {
            id: page.page_id,
            access_token,
            app_secret,
            first_message,
        });
    }
    Ok(view)
}
