//! The web console: server-rendered HTML on the admin listener under `/console`, with the
//! admin API's tokens and scopes, for operators who would rather click than `curl`.
//!
//! - [`session`]: log-in (a signed session cookie, or `Authorization: Bearer`), CSRF tokens;
//! - [`render`]: the embedded templates (autoescaped) and static files;
//! - [`views`]: the pages view, [`optins`]: at risk, failures and one opt-in's timeline;
//!   [`dead_letters`]: the dead-letter queues and their replay; [`actions`]: the other write
//!   forms (write scope, never in read-only mode).
//!
//! Every page reads without JavaScript; `console.js` only adds confirmations and refresh.
//! The handlers call the same library functions as the admin API and the CLI.

pub mod actions;
pub mod dead_letters;
pub mod optins;
pub mod render;
pub mod session;
pub mod views;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde_json::json;

use super::AdminState;
use crate::registry::RegistryError;
use render::Section;
use session::Refusal;

/// Settings of the console (`ADMIN_CONSOLE_*`).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsoleSettings {
    /// Hide and refuse every write, whatever the token (`ADMIN_CONSOLE_READ_ONLY`).
    pub read_only: bool,
    /// The console is reached over HTTPS (a TLS-terminating proxy): the session cookie is
    /// marked `Secure` (`ADMIN_CONSOLE_HTTPS`).
    pub https: bool,
}

/// Why a console request is not answered with its page; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// No session (or an expired or foreign one): the log-in form.
    #[error("log in first")]
    LoginNeeded(Option<Refusal>),
    /// An `Authorization: Bearer` token that is not one of `ADMIN_TOKENS`.
    #[error("the bearer token is not one of ADMIN_TOKENS; check the token you were given")]
    BadBearer,
    /// A write asked with a read token.
    #[error(
        "token {0:?} has scope `read`; this action needs a token with scope `write`: log out \
         and log in with one"
    )]
    Scope(String),
    /// A write asked of a read-only console.
    #[error(
        "this console is read-only (ADMIN_CONSOLE_READ_ONLY=true): use the admin API or the \
         `loginconnect` CLI for changes"
    )]
    ReadOnly,
    /// A write form without this session's CSRF token.
    #[error(
        "the form did not come from this console session (missing or stale CSRF token); \
         reload the page and submit it again"
    )]
    Csrf,
    /// Nothing there.
    #[error("{0}")]
    NotFound(String),
    /// The input is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The action is refused in the current state.
    #[error("{0}")]
    Refused(String),
    /// A dependency (database, broker) did not answer.
    #[error("{0}")]
    Unavailable(String),
    /// A template failed (a bug: the templates are compiled in and tested).
    #[error("the page could not be rendered: {0}")]
    Template(String),
}

impl From<RegistryError> for ConsoleError {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::NotFound(m) => Self::NotFound(m.clone()),
            RegistryError::Invalid(m) => Self::Invalid(m.clone()),
            RegistryError::Conflict(m) => Self::Refused(m.clone()),
            RegistryError::Keys(_) => Self::Refused(e.to_string()),
            RegistryError::Db(_) | RegistryError::Pool(_) | RegistryError::Store(_) => {
                tracing::warn!(error = %e, "admin console: database error");
                Self::Unavailable(
                    "the database did not answer; try again, and check DATABASE_URL and the \
                     database's health if it persists"
                        .into(),
                )
            }
        }
    }
}

impl ConsoleError {
    fn status(&self) -> StatusCode {
        match self {
            Self::LoginNeeded(_) => StatusCode::SEE_OTHER,
            Self::BadBearer => StatusCode::UNAUTHORIZED,
            Self::Scope(_) | Self::ReadOnly | Self::Csrf => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::Refused(_) => StatusCode::CONFLICT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Template(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match &self {
            Self::LoginNeeded(why) => {
                let to = match why {
                    Some(Refusal::Expired) => "/console/login?expired=1",
                    _ => "/console/login",
                };
                return Redirect::to(to).into_response();
            }
            Self::BadBearer => {
                let page = render::render(
                    "login.html",
                    StatusCode::UNAUTHORIZED,
                    None,
                    Section::None,
                    json!({"title": "Log in", "error": self.to_string()}),
                );
                return page.unwrap_or_else(|e| e.plain());
            }
            Self::Template(e) => tracing::error!(error = %e, "admin console: template failed"),
            _ => {}
        }
        let title = match self.status() {
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::CONFLICT => "Refused",
            StatusCode::BAD_REQUEST => "Invalid input",
            _ => "Unavailable",
        };
        render::render(
            "error.html",
            self.status(),
            None,
            Section::None,
            json!({"title": title, "message": self.to_string()}),
        )
        .unwrap_or_else(|e| e.plain())
    }
}

impl ConsoleError {
    /// The error as plain text, when even the error page cannot be rendered.
    fn plain(&self) -> Response {
        (self.status(), self.to_string()).into_response()
    }
}

/// Headers every console answer carries: no framing (clickjacking), scripts and styles only
/// from the console itself, no caching of pages that show operational data.
async fn harden(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The console's routes, nested by the admin router under `/console`.
pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/pages") }))
        .route("/login", get(actions::login_form).post(actions::login))
        .route("/logout", post(actions::logout))
        .route("/pages", get(views::pages))
        .route(
            "/pages/{page_id}/token",
            get(views::token_form).post(actions::set_token),
        )
        .route("/pages/{page_id}/pause", post(actions::pause))
        .route("/pages/{page_id}/resume", post(actions::resume))
        .route("/at-risk", get(optins::at_risk))
        .route("/failures", get(optins::failures))
        .route("/optin", get(optins::timeline))
        .route("/optin/retry", post(actions::retry))
        .route("/dead-letters", get(dead_letters::list))
        .route("/dead-letters/replay", post(dead_letters::replay))
        .route(
            "/static/console.css",
            get(|| async { render::asset("text/css; charset=utf-8", render::CSS) }),
        )
        .route(
            "/static/console.js",
            get(|| async { render::asset("text/javascript; charset=utf-8", render::JS) }),
        )
        .fallback(|| async {
            ConsoleError::NotFound("no such console page; start at /console/pages".into())
        })
        .layer(axum::middleware::map_response(harden))
}
