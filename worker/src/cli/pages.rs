//! `pages list|show|create|update|pause|resume|delete|set-token|rotate-tokens` and `apps
//! …`: the page registry and the shared page state every scheduler replica obeys. Every
//! command but `rotate-tokens` calls the same [`crate::registry::ops`] as the admin API
//! (one implementation); writes are logged with the actor `cli`.

use std::io::{BufRead, Write};

use lc_meta::pages::{FirstMessage, QuickReply};
use lc_meta::secret::Secret;
use lc_shared::config::DatabaseArgs;

use super::CliError;
use crate::registry::model::{NewApp, NewPage, PageCondition, PageUpdate};
use crate::registry::{RegistryError, ops};
use crate::scheduler::store::StoreError;
use crate::scheduler::store::pages;
use crate::scheduler::tokens::TokenKeys;

/// The actor of writes made through the CLI, in the logs.
const ACTOR: &str = "cli";

impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        CliError::Other(e.to_string())
    }
}

impl From<RegistryError> for CliError {
    fn from(e: RegistryError) -> Self {
        CliError::Other(e.to_string())
    }
}

fn json_out(out: &mut dyn Write, value: &impl serde::Serialize) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| CliError::Other(format!("cannot encode the answer: {e}")))?;
    writeln!(out, "{text}")?;
    Ok(())
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

/// `pages list`: every page's status.
pub async fn list(out: &mut dyn Write, db: &DatabaseArgs, json: bool) -> Result<(), CliError> {
    let c = client(db).await?;
    let statuses = ops::statuses(&c).await?;
    if json {
        return json_out(out, &statuses);
    }
    if statuses.is_empty() {
        writeln!(
            out,
            "no pages yet (create one with `loginconnect pages create`, or start a scheduler \
             with PAGES_FILE)"
        )?;
    }
    for p in statuses {
        let state = match (&p.paused, p.state) {
            (Some(pause), _) => format!(
                "paused ({}) since {}",
                pause.reason,
                pause.since.map_or_else(|| "?".into(), |t| t.to_string())
            ),
            (None, PageCondition::Unsubscribed) => format!(
                "unsubscribed since {}",
                p.unsubscribed_since
                    .map_or_else(|| "?".into(), |t| t.to_string())
            ),
            (None, PageCondition::Throttled) => format!(
                "throttled until {}",
                p.throttled_until
                    .map_or_else(|| "?".into(), |t| t.to_string())
            ),
            (None, PageCondition::NoToken) => "no token: nothing is sent".into(),
            (None, _) => "active".into(),
        };
        let rate = p
            .rate_limit
            .map_or_else(|| "-".to_owned(), |r| r.to_string());
        let slowed = match p.rate_factor {
            Some(f) if f < 1.0 => format!(" (slowed to {:.0} %)", f * 100.0),
            _ => String::new(),
        };
        let token = match p.token {
            crate::registry::model::TokenOrigin::Stored => "  [token set in the database]",
            _ => "",
        };
        let file = if p.in_pages_file {
            ""
        } else {
            "  [not in the pages file]"
        };
        writeln!(out, "{}  {rate}/s{slowed}  {state}{token}{file}", p.page_id)?;
        if let Some(detail) = p.paused.and_then(|p| p.detail) {
            writeln!(out, "    {detail}")?;
        }
    }
    Ok(())
}

/// `pages show PAGE`: the page as the registry holds it, and its status.
pub async fn show(out: &mut dyn Write, db: &DatabaseArgs, page: &str) -> Result<(), CliError> {
    let c = client(db).await?;
    let record = ops::page(&c, page).await?;
    let status = ops::status(&c, page).await?;
    json_out(out, &serde_json::json!({"page": record, "status": status}))
}

/// The first message given by `--text` and `--quick-reply TITLE=PAYLOAD`.
fn first_message(text: String, quick_replies: &[String]) -> Result<FirstMessage, CliError> {
    let quick_replies = quick_replies
        .iter()
        .map(|q| {
            q.split_once('=')
                .map(|(title, payload)| QuickReply {
                    title: title.to_owned(),
                    payload: payload.to_owned(),
                })
                .ok_or_else(|| {
                    CliError::Other(format!(
                        "--quick-reply {q:?} is not TITLE=PAYLOAD (e.g. \"Track my order=TRACK\")"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The flags describe a page's own message only: `--text` replaces the whole first
    // message, variants included (variants are set through the pages file or the admin API,
    // whose JSON carries them).
    Ok(FirstMessage {
        text,
        quick_replies,
        variants: Vec::new(),
    })
}

/// What `pages create` and `pages update` take.
#[derive(Debug, Clone, Default)]
pub struct PageFields {
    /// `--text`.
    pub text: Option<String>,
    /// `--quick-reply`.
    pub quick_replies: Vec<String>,
    /// `--app`.
    pub app_id: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--rate-limit`.
    pub rate_limit: Option<u32>,
    /// `--default-rate-limit` (update: back to `PAGE_RATE_LIMIT`).
    pub default_rate_limit: bool,
}

/// `pages create PAGE --text …`.
pub async fn create(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    page: &str,
    fields: PageFields,
) -> Result<(), CliError> {
    let text = fields
        .text
        .ok_or_else(|| CliError::Other("give the first message with --text".into()))?;
    let new = NewPage {
        page_id: page.to_owned(),
        app_id: fields.app_id,
        name: fields.name,
        first_message: first_message(text, &fields.quick_replies)?,
        rate_limit: fields.rate_limit,
    };
    let c = client(db).await?;
    let created = ops::create_page(&c, ACTOR, &new).await?;
    json_out(out, &created)?;
    writeln!(
        out,
        "page {page} created; set its token next (`loginconnect pages set-token {page}`)"
    )?;
    Ok(())
}

/// `pages update PAGE [--text …] [--rate-limit N | --default-rate-limit] [--name N]`.
pub async fn update(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    page: &str,
    fields: PageFields,
) -> Result<(), CliError> {
    if fields.text.is_none() && !fields.quick_replies.is_empty() {
        return Err(CliError::Other(
            "--quick-reply replaces the first message: give its --text too".into(),
        ));
    }
    let update = PageUpdate {
        first_message: fields
            .text
            .map(|t| first_message(t, &fields.quick_replies))
            .transpose()?,
        rate_limit: if fields.default_rate_limit {
            Some(None)
        } else {
            fields.rate_limit.map(Some)
        },
        name: fields.name.map(Some),
    };
    let c = client(db).await?;
    let changed = ops::update_page(&c, ACTOR, page, &update).await?;
    json_out(out, &changed)?;
    writeln!(out, "every scheduler uses the change within a second")?;
    Ok(())
}

/// `pages pause PAGE`.
pub async fn pause(out: &mut dyn Write, db: &DatabaseArgs, page: &str) -> Result<(), CliError> {
    let mut c = client(db).await?;
    ops::pause(&mut c, ACTOR, page).await?;
    writeln!(
        out,
        "page {page} paused on every replica (`loginconnect pages resume {page}` lifts it)"
    )?;
    Ok(())
}

/// `pages resume PAGE`.
pub async fn resume(out: &mut dyn Write, db: &DatabaseArgs, page: &str) -> Result<(), CliError> {
    let mut c = client(db).await?;
    ops::resume(&mut c, ACTOR, page).await?;
    writeln!(out, "page {page} resumed on every replica")?;
    Ok(())
}

/// `pages delete PAGE`.
pub async fn delete(out: &mut dyn Write, db: &DatabaseArgs, page: &str) -> Result<(), CliError> {
    let mut c = client(db).await?;
    ops::delete_page(&mut c, ACTOR, page).await?;
    writeln!(out, "page {page} deleted (with its stored token and state)")?;
    Ok(())
}

/// `apps create`.
pub async fn app_create(
    out: &mut dyn Write,
    db: &DatabaseArgs,
    new: NewApp,
) -> Result<(), CliError> {
    let c = client(db).await?;
    let app = ops::create_app(&c, ACTOR, &new).await?;
    json_out(out, &app)
}

/// `apps list`.
pub async fn app_list(out: &mut dyn Write, db: &DatabaseArgs) -> Result<(), CliError> {
    let c = client(db).await?;
    json_out(out, &ops::apps(&c).await?)
}

/// `apps show APP`.
pub async fn app_show(out: &mut dyn Write, db: &DatabaseArgs, app: &str) -> Result<(), CliError> {
    let c = client(db).await?;
    json_out(out, &ops::app(&c, app).await?)
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
    let mut c = client(db).await?;
    let key_id = ops::set_token(&mut c, &keys, ACTOR, page, &token).await?;
    writeln!(
        out,
        "token of page {page} stored (key {key_id}); every scheduler uses it within a second"
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
