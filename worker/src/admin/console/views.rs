//! The console's read-only pages. Each reads through the library functions the admin API
//! uses and renders a template; write controls appear only for users who may use them.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::ConsoleError;
use super::render::{Section, render, span, when};
use super::session::ConsoleUser;
use crate::admin::AdminState;
use crate::registry::model::{PageCondition, PageStatus, TokenOrigin};
use crate::registry::{RegistryError, ops};

/// What an action did, shown once on the page it leads back to (`?done=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Done {
    /// A page was paused.
    Paused,
    /// A page was resumed.
    Resumed,
    /// A page's token was replaced.
    TokenReplaced,
    /// A failed opt-in was set back to pending.
    Retried,
    /// Dead letters were replayed.
    Replayed,
}

impl Done {
    /// The sentence shown for it (`subject`: the page, opt-in or queue concerned).
    pub fn sentence(self, subject: &str) -> String {
        match self {
            Self::Paused => format!("Page {subject} is paused on every replica."),
            Self::Resumed => format!("Page {subject} is resumed on every replica."),
            Self::TokenReplaced => {
                format!("The token of page {subject} is replaced (stored encrypted).")
            }
            Self::Retried => {
                format!("Opt-in {subject} is pending again; a scheduler sends it within seconds.")
            }
            Self::Replayed => format!("Replayed to the origin queue: {subject}."),
        }
    }
}

/// The `?done=&subject=` of a page an action led back to.
#[derive(Debug, Default, Deserialize)]
pub struct Notice {
    done: Option<Done>,
    #[serde(default)]
    subject: String,
}

impl Notice {
    pub(super) fn text(&self) -> Option<String> {
        self.done.map(|d| d.sentence(&self.subject))
    }
}

pub(super) async fn client(s: &AdminState) -> Result<deadpool_postgres::Object, ConsoleError> {
    s.pool
        .get()
        .await
        .map_err(|e| ConsoleError::from(RegistryError::Pool(e)))
}

/// One row of the pages table.
#[derive(Serialize)]
struct PageRowView {
    page_id: String,
    name: String,
    state: PageCondition,
    state_text: String,
    detail: String,
    token: &'static str,
    rate: String,
    resumable: bool,
    pausable: bool,
}

fn page_row(s: PageStatus, name: Option<String>) -> PageRowView {
    let mut detail = Vec::new();
    if let Some(p) = &s.paused {
        let mut d = format!("paused ({})", p.reason);
        if p.since.is_some() {
            d.push_str(&format!(" since {}", when(p.since)));
        }
        if let Some(why) = &p.detail {
            d.push_str(&format!(": {why}"));
        }
        detail.push(d);
    }
    if s.unsubscribed_since.is_some() {
        detail.push(format!(
            "webhook subscription lost since {}",
            when(s.unsubscribed_since)
        ));
    }
    if s.throttled_until.is_some() {
        detail.push(format!("throttled until {}", when(s.throttled_until)));
    }
    let state_text = match (&s.state, &s.paused) {
        (PageCondition::Paused, Some(p)) => format!("paused: {}", p.reason),
        (PageCondition::Active, _) => "active".into(),
        (PageCondition::Paused, None) => "paused".into(),
        (PageCondition::Unsubscribed, _) => "unsubscribed".into(),
        (PageCondition::Throttled, _) => "throttled".into(),
        (PageCondition::NoToken, _) => "no token".into(),
    };
    let rate = match (s.rate_limit, s.rate_factor) {
        (Some(r), Some(f)) if f < 1.0 => format!("{r}/s × {f:.2}"),
        (Some(r), _) => format!("{r}/s"),
        (None, _) => "—".into(),
    };
    PageRowView {
        name: name.unwrap_or_default(),
        state: s.state,
        state_text,
        detail: detail.join("; "),
        token: match s.token {
            TokenOrigin::Stored => "stored",
            TokenOrigin::PagesFile => "pages file",
            TokenOrigin::Missing => "missing",
        },
        rate,
        resumable: s.paused.is_some() || s.throttled_until.is_some(),
        pausable: s.paused.is_none(),
        page_id: s.page_id,
    }
}

/// `GET /console/pages`: every page with its status.
pub async fn pages(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Query(notice): Query<Notice>,
) -> Result<Response, ConsoleError> {
    let c = client(&s).await?;
    let mut names: HashMap<String, Option<String>> = ops::pages(&c)
        .await?
        .into_iter()
        .map(|p| (p.page_id, p.name))
        .collect();
    let rows: Vec<PageRowView> = ops::statuses(&c)
        .await?
        .into_iter()
        .map(|st| {
            let name = names.remove(&st.page_id).flatten();
            page_row(st, name)
        })
        .collect();
    render(
        "pages.html",
        StatusCode::OK,
        Some(&user),
        Section::Pages,
        json!({"title": "Pages", "pages": rows, "notice": notice.text(), "refresh": 30}),
    )
}

/// `GET /console/pages/{page_id}/token`: the form replacing a page's token.
pub async fn token_form(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Path(page_id): Path<String>,
) -> Result<Response, ConsoleError> {
    // The form is never shown to whom could not submit it.
    user.may_write()?;
    let c = client(&s).await?;
    let page = ops::page(&c, &page_id).await?;
    render(
        "token.html",
        StatusCode::OK,
        Some(&user),
        Section::Pages,
        json!({"title": format!("Replace the token of page {page_id}"), "page_id": page.page_id,
               "name": page.name}),
    )
}

/// How far in the past or future `t` is, as people read it.
pub fn relative(seconds: i64) -> String {
    if seconds >= 0 {
        format!("in {}", span(seconds))
    } else {
        format!("{} ago", span(-seconds))
    }
}
