//! The operator CLI (`loginconnect`): migrations, status, dead letters, opt-ins, links, pages,
//! the funnel.
//!
//! Each subcommand is a small function over the same database pool and broker connection the
//! services use; output is human-readable, `--json` where a script may read it.

mod dead_letters;
mod funnel;
mod inspect;
mod login;
mod pages;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use lc_shared::config::{AmqpArgs, DatabaseArgs};

/// `loginconnect` — operate a loginconnect deployment.
#[derive(Debug, clap::Parser)]
#[command(
    name = "loginconnect",
    version,
    about = "Operator CLI of loginconnect."
)]
pub struct Cli {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub database: DatabaseArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Apply pending database migrations (safe to run from several places at once).
    Migrate,
    /// Opt-ins by state, nearest pending deadline, paused pages, dead-letter depths, outbox lag.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The opt-in funnel per page and UTC day: opted in, sent, replied, linked, expired,
    /// failed (by reason), time to first message and to reply (what is still retained).
    Funnel {
        /// Only this page.
        #[arg(long)]
        page: Option<String>,
        /// First UTC day, YYYY-MM-DD (default: six days before today).
        #[arg(long)]
        from: Option<String>,
        /// Day after the last, YYYY-MM-DD, exclusive (default: tomorrow).
        #[arg(long)]
        to: Option<String>,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect or replay dead-lettered messages and unparsed bodies.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// Inspect or reset one opt-in.
    #[command(subcommand)]
    Optin(OptinCommand),
    /// Inspect identity links.
    #[command(subcommand)]
    Link(LinkCommand),
    /// The pages: validate the file and check tokens; the page registry (list, show, create,
    /// update, pause, resume, delete); store or rotate tokens.
    #[command(subcommand)]
    Pages(PagesCommand),
    /// The apps pages belong to (technology providers with an app per client).
    #[command(subcommand)]
    Apps(AppsCommand),
    /// Serve the admin API (pages, apps, statuses, opt-ins, links, failures, retries, dead
    /// letters over JSON/HTTP on `ADMIN_ADDR`) until SIGTERM or Ctrl-C; the database is
    /// migrated first; dead letters use `AMQP_URL`.
    Admin(crate::admin::AdminArgs),
    /// Print the manual Facebook Login dialog URL for Login Connect (and the JS SDK call).
    LoginUrl(login::LoginUrlArgs),
    /// GET a URL and exit 0 on 2xx (container healthchecks without curl).
    Probe {
        /// The URL, e.g. http://127.0.0.1:8080/readyz.
        url: String,
    },
}

/// `dead-letters …`
#[derive(Debug, clap::Subcommand)]
pub enum DeadLettersCommand {
    /// Show the messages of a dead-letter queue without removing them.
    List {
        /// `scheduler.optins.dlq`, `correlator.replies.dlq` or `messenger.unparsed`; all when omitted.
        #[arg(long)]
        queue: Option<String>,
        /// Most messages shown per queue.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Put messages back on their work queue (after a fix); unparsed bodies are parsed again.
    Replay {
        /// The queue to replay from.
        #[arg(long)]
        queue: String,
        /// Most messages replayed.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// `optin …`
#[derive(Debug, clap::Subcommand)]
pub enum OptinCommand {
    /// Show one opt-in.
    Show {
        /// The page id.
        #[arg(long)]
        page: String,
        /// The login_id.
        #[arg(long = "login-id")]
        login_id: String,
    },
    /// Delete one login_id's opt-in and link, so a new opt-in starts afresh (for testing with
    /// `reset_messenger_state=1`, which works for app-role users only).
    Reset {
        /// The page id.
        #[arg(long)]
        page: String,
        /// The login_id.
        #[arg(long = "login-id")]
        login_id: String,
    },
}

/// `link …`
#[derive(Debug, clap::Subcommand)]
pub enum LinkCommand {
    /// Show the links of a login_id or a PSID.
    Show {
        /// Look up by login_id.
        #[arg(
            long = "login-id",
            conflicts_with = "psid",
            required_unless_present = "psid"
        )]
        login_id: Option<String>,
        /// Look up by PSID.
        #[arg(long)]
        psid: Option<String>,
    },
}

/// `pages …`
#[derive(Debug, clap::Subcommand)]
pub enum PagesCommand {
    /// Validate the pages file and check every token with `GET /me`.
    Check {
        /// The pages file.
        #[arg(long = "pages-file", env = "PAGES_FILE")]
        pages_file: PathBuf,
        /// Graph base URL including the version.
        #[arg(long = "graph-api-url", env = "GRAPH_API_URL", default_value = lc_shared::config::DEFAULT_GRAPH_API_URL)]
        graph_api_url: String,
        /// Only validate the file; make no Graph calls.
        #[arg(long)]
        offline: bool,
    },
    /// Every page's status: send limit, slow-down, pause (why, since when), unsubscribed,
    /// throttle, where its token comes from, whether the pages file has it.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One page as the registry holds it, with its status (JSON).
    Show {
        /// The page id.
        page: String,
    },
    /// Create a page in the registry (then set its token with `pages set-token`).
    Create {
        /// The page id.
        page: String,
        #[command(flatten)]
        #[allow(
            missing_docs,
            reason = "clap takes a flattened group's help from the group"
        )]
        fields: PageFieldArgs,
    },
    /// Change a page's first message, rate limit or name; every replica uses it within a
    /// second.
    Update {
        /// The page id.
        page: String,
        #[command(flatten)]
        #[allow(
            missing_docs,
            reason = "clap takes a flattened group's help from the group"
        )]
        fields: PageFieldArgs,
        /// Drop the page's own rate limit (back to `PAGE_RATE_LIMIT`).
        #[arg(long = "default-rate-limit", conflicts_with = "rate_limit")]
        default_rate_limit: bool,
    },
    /// Pause a page on every replica until `pages resume`.
    Pause {
        /// The page id.
        page: String,
    },
    /// Lift a page's pause and throttle on every replica (after fixing the cause at Meta).
    Resume {
        /// The page id.
        page: String,
    },
    /// Delete a page with its stored token and state (refused while it is in the pages file).
    Delete {
        /// The page id.
        page: String,
    },
    /// Store a new token for a page (encrypted with the first of `PAGE_TOKEN_KEYS`); every
    /// replica uses it within a second and a token pause is lifted. The token is read from
    /// standard input, a variable (`--from-env`) or a file (`--from-file`), never from the
    /// command line.
    SetToken {
        /// The page id.
        page: String,
        /// Read the token from this environment variable instead of standard input.
        #[arg(long = "from-env", conflicts_with = "from_file")]
        from_env: Option<String>,
        /// Read the token from this file (a mounted secret) instead of standard input.
        #[arg(long = "from-file")]
        from_file: Option<PathBuf>,
        #[command(flatten)]
        #[allow(
            missing_docs,
            reason = "clap takes a flattened group's help from the group"
        )]
        keys: TokenKeysArg,
    },
    /// Re-encrypt every stored token with the first of `PAGE_TOKEN_KEYS` (key rotation).
    RotateTokens {
        #[command(flatten)]
        #[allow(
            missing_docs,
            reason = "clap takes a flattened group's help from the group"
        )]
        keys: TokenKeysArg,
    },
}

/// The fields of `pages create` and `pages update`.
#[derive(Debug, Clone, clap::Args)]
pub struct PageFieldArgs {
    /// The first message's text (required by `create`; with `update`, replaces the message).
    #[arg(long)]
    pub text: Option<String>,
    /// A quick reply of the first message, `TITLE=PAYLOAD` (repeat for several).
    #[arg(long = "quick-reply")]
    pub quick_replies: Vec<String>,
    /// The app the page belongs to (`apps create` first).
    #[arg(long = "app")]
    pub app_id: Option<String>,
    /// A name for people.
    #[arg(long)]
    pub name: Option<String>,
    /// The page's own limit of Send API calls per second (default `PAGE_RATE_LIMIT`).
    #[arg(long = "rate-limit")]
    pub rate_limit: Option<u32>,
}

impl PageFieldArgs {
    fn fields(self, default_rate_limit: bool) -> pages::PageFields {
        pages::PageFields {
            text: self.text,
            quick_replies: self.quick_replies,
            app_id: self.app_id,
            name: self.name,
            rate_limit: self.rate_limit,
            default_rate_limit,
        }
    }
}

/// `apps …`
#[derive(Debug, clap::Subcommand)]
pub enum AppsCommand {
    /// Register an app; its secrets are named by environment variable, never given.
    Create {
        /// The Meta app id.
        #[arg(long = "app-id")]
        app_id: String,
        /// The environment variable holding the app secret on every replica.
        #[arg(long = "app-secret-env")]
        app_secret_env: String,
        /// A separate Facebook Login app.
        #[arg(long = "login-app-id")]
        login_app_id: Option<String>,
        /// The environment variable holding the Login app's client token.
        #[arg(long = "client-token-env")]
        client_token_env: Option<String>,
    },
    /// Every app (JSON).
    List,
    /// One app (JSON).
    Show {
        /// The app id.
        app: String,
    },
}

/// `PAGE_TOKEN_KEYS` for the commands that encrypt or decrypt stored page tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenKeysArg {
    /// Token encryption keys, `id:base64-of-32-bytes`, comma-separated; the first encrypts
    /// (the schedulers' `PAGE_TOKEN_KEYS`; for a rotation, the new key first).
    #[arg(
        long = "page-token-keys",
        env = "PAGE_TOKEN_KEYS",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true
    )]
    pub keys: String,
}

/// Errors of the CLI; each says what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Database problem.
    #[error(transparent)]
    Db(#[from] lc_shared::db::DbError),
    /// Query failed.
    #[error("database error: {}", lc_shared::db::describe(.0))]
    Query(#[from] tokio_postgres::Error),
    /// Pool failed.
    #[error("database connection error: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// Broker problem.
    #[error(transparent)]
    Amqp(#[from] lc_shared::amqp::AmqpError),
    /// Broker call failed.
    #[error("RabbitMQ error: {0}")]
    Lapin(#[from] lapin::Error),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    /// Listing or replaying dead letters failed.
    #[error(transparent)]
    DeadLetters(#[from] crate::operate::dead_letters::DeadLetterError),
    /// Anything else, already phrased for the operator.
    #[error("{0}")]
    Other(String),
}

/// Runs one CLI command, writing its output to `out` (stdout in the binary).
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CliError> {
    match cli.command {
        Command::Migrate => {
            lc_shared::db::ensure_database(&cli.database.database_url).await?;
            lc_shared::db::refuse_transaction_pooling(&cli.database.database_url).await?;
            let pool = lc_shared::db::pool(&cli.database.database_url, 1)?;
            let applied = lc_shared::db::migrate(&pool).await?;
            writeln!(
                out,
                "database at version {} ({} migration(s) applied now)",
                lc_shared::db::latest_migration_version(),
                applied.len()
            )?;
            Ok(())
        }
        Command::Admin(args) => serve_admin(&cli.database, &cli.amqp, &args).await,
        Command::Status { json } => inspect::status(out, &cli.database, &cli.amqp, json).await,
        Command::Funnel {
            page,
            from,
            to,
            json,
        } => {
            funnel::funnel(
                out,
                &cli.database,
                page.as_deref(),
                from.as_deref(),
                to.as_deref(),
                json,
            )
            .await
        }
        Command::DeadLetters(DeadLettersCommand::List { queue, limit }) => {
            dead_letters::list(out, &cli.amqp, queue.as_deref(), limit).await
        }
        Command::DeadLetters(DeadLettersCommand::Replay { queue, limit }) => {
            dead_letters::replay(out, &cli.amqp, &queue, limit).await
        }
        Command::Optin(OptinCommand::Show { page, login_id }) => {
            inspect::optin_show(out, &cli.database, &page, &login_id).await
        }
        Command::Optin(OptinCommand::Reset { page, login_id }) => {
            inspect::optin_reset(out, &cli.database, &page, &login_id).await
        }
        Command::Link(LinkCommand::Show { login_id, psid }) => {
            inspect::link_show(out, &cli.database, login_id.as_deref(), psid.as_deref()).await
        }
        Command::Pages(PagesCommand::Check {
            pages_file,
            graph_api_url,
            offline,
        }) => inspect::pages_check(out, &pages_file, &graph_api_url, offline).await,
        Command::Pages(PagesCommand::List { json }) => pages::list(out, &cli.database, json).await,
        Command::Pages(PagesCommand::Show { page }) => pages::show(out, &cli.database, &page).await,
        Command::Pages(PagesCommand::Create { page, fields }) => {
            pages::create(out, &cli.database, &page, fields.fields(false)).await
        }
        Command::Pages(PagesCommand::Update {
            page,
            fields,
            default_rate_limit,
        }) => pages::update(out, &cli.database, &page, fields.fields(default_rate_limit)).await,
        Command::Pages(PagesCommand::Pause { page }) => {
            pages::pause(out, &cli.database, &page).await
        }
        Command::Pages(PagesCommand::Resume { page }) => {
            pages::resume(out, &cli.database, &page).await
        }
        Command::Pages(PagesCommand::Delete { page }) => {
            pages::delete(out, &cli.database, &page).await
        }
        Command::Apps(AppsCommand::Create {
            app_id,
            app_secret_env,
            login_app_id,
            client_token_env,
        }) => {
            let new = crate::registry::model::NewApp {
                app_id,
                app_secret_env,
                login_app_id,
                client_token_env,
            };
            pages::app_create(out, &cli.database, new).await
        }
        Command::Apps(AppsCommand::List) => pages::app_list(out, &cli.database).await,
        Command::Apps(AppsCommand::Show { app }) => pages::app_show(out, &cli.database, &app).await,
        Command::Pages(PagesCommand::SetToken {
            page,
            from_env,
            from_file,
            keys,
        }) => {
            let source = match (from_env, from_file) {
                (Some(var), _) => pages::TokenSource::Env(var),
                (None, Some(path)) => pages::TokenSource::File(path),
                (None, None) => pages::TokenSource::Stdin,
            };
            pages::set_token(out, &cli.database, &page, source, &keys.keys).await
        }
        Command::Pages(PagesCommand::RotateTokens { keys }) => {
            pages::rotate_tokens(out, &cli.database, &keys.keys).await
        }
        Command::LoginUrl(args) => login::login_url(out, &args),
        Command::Probe { url } => probe(out, &url).await,
    }
}

/// Most characters of a failing answer's body that `probe` prints.
const PROBE_BODY_CHARS: usize = 2000;

async fn probe(out: &mut dyn Write, url: &str) -> Result<(), CliError> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| CliError::Other(format!("cannot build HTTP client: {e}")))?;
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| CliError::Other(format!("{url}: {e}")))?;
    let status = resp.status();
    if status.is_success() {
        writeln!(out, "{url}: {status}")?;
        Ok(())
    } else {
        // `/readyz` says why in its body (reasons carry no secrets); a short excerpt is
        // enough for a health-check log.
        let body = resp.text().await.unwrap_or_default();
        let excerpt: String = body.trim().chars().take(PROBE_BODY_CHARS).collect();
        Err(CliError::Other(format!("{url}: {status} {excerpt}")))
    }
}

/// `admin`: migrates, then serves the admin API until a signal.
async fn serve_admin(
    db: &DatabaseArgs,
    amqp: &AmqpArgs,
    args: &crate::admin::AdminArgs,
) -> Result<(), CliError> {
    let mut settings = args
        .settings()
        .map_err(|e| CliError::Other(e.to_string()))?;
    // Checked now, so a wrong AMQP_TLS_* file stops the start with its name; the broker is
    // connected to only when a dead-letter route is called.
    settings.amqp = Some(amqp.endpoint().map_err(lc_shared::amqp::AmqpError::from)?);
    lc_shared::db::ensure_database(&db.database_url).await?;
    let pool = lc_shared::db::pool(&db.database_url, db.database_pool_size)?;
    lc_shared::db::migrate(&pool).await?;
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .map_err(|e| {
            CliError::Other(format!(
                "cannot listen on {} for the admin API: {e} (set ADMIN_ADDR)",
                args.admin_addr
            ))
        })?;
    let shutdown = lc_shared::shutdown::Shutdown::on_signals();
    let running = crate::admin::start(pool, settings, listener, shutdown)
        .map_err(|e| CliError::Other(e.to_string()))?;
    let _ = running.task.await;
    Ok(())
}
