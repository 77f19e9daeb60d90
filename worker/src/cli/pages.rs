//! `pages list|resume|set-token|rotate-tokens`: the shared page state every scheduler
//! replica obeys, and tokens set without touching the pages file or restarting anything.

use std::io::{BufRead, Write};

use lc_meta::secret::Secret;
use lc_shared::config::DatabaseArgs;

use super::CliError;
use crate::scheduler::store::StoreError;
use crate::scheduler::store::pages;
use crate::scheduler::tokens::TokenKeys;

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::Other(e.to_string())
    }
}

async fn client(db: &DatabaseArgs) -> Result<deadpool_postgres::Object, CliError> {
    let pool = lc_shared::db::pool(&db.database_url, 1)?;
    Ok(pool.get().await?)
}

fn keys(list: &str) -> Result<TokenKeys, CliError> {
    let keys = TokenKeys::parse(list).map_err(|e| CliError::Other(e.to_string()))?;
    if keys.is_empty() {
        return Err(CliError::Other(
            "PAGE_TOKEN_KEYS is not set: give the same keys the schedulers have (`id:base64`, \
             generate a key with `openssl rand -base64 32`)"
                .into(),
        ));
    }
    Ok(keys)
}

/// `pages list`.
pub async fn list(out: &mut dyn Write, db: &DatabaseArgs, json: bool) -> Result<(), CliError> {
    let c = client(db).await?;
    let pages = pages::list(&c).await?;
    if json {
        let text = serde_json::to_string_pretty(&pages)
            .map_err(|e| CliError::Other(format!("cannot encode the page list: {e}")))?;
        writeln!(out, "{text}")?;
        return Ok(());
    }
    if pages.is_empty() {
        writeln!(
            out,
            "no pages yet (a scheduler records its pages when it starts)"
        )?;
    }
    for p in pages {
        let state = match (&p.paused_reason, p.throttled_until) {
            (Some(reason), _) => format!(
                "paused ({reason}) since {}",
                p.paused_since.map_or_else(|| "?".into(), |t| t.to_string())
            ),
            (None, Some(until)) => format!("throttled until {until}"),
            (None, None) => "active".into(),
        };
        writeln!(
            out,
            "{}  {}/s{}  {state}{}",
            p.page_id,
            p.rate_limit,
            if p.rate_factor < 1.0 {
                format!(" (slowed to {:.0} %)", p.rate_factor * 100.0)
            } else {
                String::new()
            },
            if p.token_override {
                "  [token set in the database]"
            } else {
                ""
            }
        )?;
        if let Some(detail) = p.paused_detail {
            writeln!(out, "    {detail}")?;
        }
    }
    Ok(())
}

/// `pages resume PAGE`.
pub async fn resume(out: &mut dyn Write, db: &DatabaseArgs, page: &str) -> Result<(), CliError> {
    let mut c = client(db).await?;
    if !pages::resume(&mut c, page).await? {
        return Err(CliError::Other(format!(
            "page {page} is unknown here (`loginconnect pages list` shows the known pages)"
        )));
    }
    writeln!(out, "page {page} resumed on every replica")?;
    Ok(())
}

/// Where `pages set-token` reads the token from (never the command line, which `ps` shows).
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// One line of standard input.
    Stdin,
    /// An environment variable, by name.
    Env(String),
    /// A file (a mounted secret).
    File(std::path::PathBuf),
}

/// `pages set-token PAGE [--from-env VAR | --from-file PATH]`.
pub async fn set_token(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    page: &str,
    source: TokenSource,
    key_list: &str,
) -> Result<(), CliError> {
    let keys = keys(key_list)?;
    let token = match source {
        TokenSource::Env(var) => std::env::var(&var)
            .map_err(|_| CliError::Other(format!("environment variable {var} is not set")))?,
        TokenSource::File(path) => std::fs::read_to_string(&path).map_err(|e| {
            CliError::Other(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?,
        TokenSource::Stdin => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| CliError::Other(format!("cannot read the token from stdin: {e}")))?;
            line
        }
    };
    let token = Secret::new(token.trim().to_owned());
    if token.is_empty() {
        return Err(CliError::Other(
            "the token is empty: pass it on standard input or name a variable with --from-env"
                .into(),
        ));
    }
    let sealed = keys
        .seal(page, &token)
        .map_err(|e| CliError::Other(e.to_string()))?;
    let mut c = client(db).await?;
    pages::store_token(&mut c, &sealed, true).await?;
    writeln!(
        out,
        "token of page {page} stored (key {}); every scheduler uses it within a second",
        sealed.key_id
    )?;
    Ok(())
}

/// `pages rotate-tokens`.
pub async fn rotate_tokens(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    key_list: &str,
) -> Result<(), CliError> {
    let keys = keys(key_list)?;
    let mut c = client(db).await?;
    let stored = pages::load_tokens(&c).await?;
    let mut n = 0usize;
    for row in &stored {
        let token = keys.open(row).map_err(|e| CliError::Other(e.to_string()))?;
        let sealed = keys
            .seal(&row.page_id, &token)
            .map_err(|e| CliError::Other(e.to_string()))?;
        // The same token under the new key: a token pause stays as it is.
        pages::store_token(&mut c, &sealed, false).await?;
        n += 1;
    }
    writeln!(out, "{n} token(s) re-encrypted")?;
    Ok(())
}
