//! The console's opt-in pages: at risk (nearest deadline first), recent failures with
//! Graph's error, and one opt-in's timeline. They read through [`crate::operate`], as the
//! admin API does, and turn its records into rows for people (times, spans, words).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;

use super::ConsoleError;
use super::actions::query_escape;
use super::render::{Section, render, when, when_precise};
use super::session::ConsoleUser;
use super::views::{Notice, client, relative};
use crate::operate::{self, GraphError, OperateError};
use lc_shared::optin::OptinState;

/// Rows a list shows unless `?limit=` asks otherwise.
const DEFAULT_LIMIT: i64 = 100;

impl From<OperateError> for ConsoleError {
    fn from(e: OperateError) -> Self {
        tracing::warn!(error = %e, "admin console: database error");
        Self::Unavailable(
            "the database did not answer; try again, and check DATABASE_URL and the \
             database's health if it persists"
                .into(),
        )
    }
}

/// Graph's error in one line: `code 100/2018001: message (fbtrace_id X)`.
fn graph_text(e: Option<&GraphError>) -> String {
    let Some(e) = e else {
        return String::new();
    };
    let mut out = String::new();
    match (e.code, e.subcode) {
        (Some(c), Some(s)) => out.push_str(&format!("code {c}/{s}")),
        (Some(c), None) => out.push_str(&format!("code {c}")),
        _ => {}
    }
    if let Some(m) = &e.message {
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(m);
    }
    if let Some(t) = &e.fbtrace_id {
        out.push_str(&format!(" (fbtrace_id {t})"));
    }
    out
}

/// `?limit=&page_id=` of the lists.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
    page_id: Option<String>,
}

/// The console address of an opt-in's timeline.
pub fn timeline_href(page_id: &str, login_id: &str) -> String {
    format!(
        "/console/optin?page_id={}&login_id={}",
        query_escape(page_id),
        query_escape(login_id)
    )
}

/// A row of the at-risk table.
#[derive(Serialize)]
struct AtRiskRow {
    href: String,
    page_id: String,
    login_id: String,
    state: OptinState,
    deadline: String,
    slack: String,
    late: bool,
    attempts: i32,
    next_attempt: String,
    last_error: String,
    paused: Option<String>,
}

/// `GET /console/at-risk`: waiting opt-ins, nearest deadline first.
pub async fn at_risk(
    user: ConsoleUser,
    State(s): State<crate::admin::AdminState>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ConsoleError> {
    let c = client(&s).await?;
    let now = OffsetDateTime::now_utc();
    let rows: Vec<AtRiskRow> = operate::at_risk(&c, q.limit.unwrap_or(DEFAULT_LIMIT))
        .await?
        .into_iter()
        .map(|o| AtRiskRow {
            href: timeline_href(&o.page_id, &o.login_id),
            deadline: when(Some(o.deadline)),
            slack: relative(o.slack_secs),
            // Under an hour left: shown in words ("late") as well as in colour.
            late: o.slack_secs < 3600,
            next_attempt: relative((o.next_attempt_at - now).whole_seconds()),
            last_error: graph_text(o.last_error.as_ref()),
            paused: o.paused_reason,
            page_id: o.page_id,
            login_id: o.login_id,
            state: o.state,
            attempts: o.attempts,
        })
        .collect();
    render(
        "at_risk.html",
        StatusCode::OK,
        Some(&user),
        Section::AtRisk,
        json!({"title": "Opt-ins at risk", "rows": rows, "refresh": 30}),
    )
}

/// A row of the failures table.
#[derive(Serialize)]
struct FailureRow {
    href: String,
    page_id: String,
    login_id: String,
    state: OptinState,
    reason: String,
    attempts: i32,
    finished: String,
    deadline: String,
    window_open: bool,
    graph_error: String,
}

/// `GET /console/failures`: failed and expired opt-ins, newest first.
pub async fn failures(
    user: ConsoleUser,
    State(s): State<crate::admin::AdminState>,
    Query(q): Query<ListQuery>,
    Query(notice): Query<Notice>,
) -> Result<Response, ConsoleError> {
    let page = q.page_id.filter(|p| !p.trim().is_empty());
    let c = client(&s).await?;
    let now = OffsetDateTime::now_utc();
    let rows: Vec<FailureRow> =
        operate::failures(&c, page.as_deref(), q.limit.unwrap_or(DEFAULT_LIMIT))
            .await?
            .into_iter()
            .map(|f| FailureRow {
                href: timeline_href(&f.page_id, &f.login_id),
                reason: f
                    .failure_reason
                    .map_or_else(|| "window closed".to_owned(), |r| r.as_str().to_owned()),
                finished: when(Some(f.finished_at)),
                deadline: when(Some(f.deadline)),
                // The retry itself decides whether it is safe; this only hides a button
                // that could never work.
                window_open: f.state == OptinState::Failed && f.deadline > now,
                graph_error: graph_text(f.last_error.as_ref()),
                page_id: f.page_id,
                login_id: f.login_id,
                state: f.state,
                attempts: f.attempts,
            })
            .collect();
    render(
        "failures.html",
        StatusCode::OK,
        Some(&user),
        Section::Failures,
        json!({"title": "Recent failures", "rows": rows, "page_id": page,
               "notice": notice.text()}),
    )
}

/// `?page_id=&login_id=` of the timeline.
#[derive(Debug, Default, Deserialize)]
pub struct OptinQuery {
    page_id: Option<String>,
    login_id: Option<String>,
}

/// A step or event line of the timeline.
#[derive(Serialize)]
struct Line {
    what: String,
    at: String,
    detail: String,
}

/// `GET /console/optin?page_id=&login_id=`: the look-up form, and the opt-in's timeline.
pub async fn timeline(
    user: ConsoleUser,
    State(s): State<crate::admin::AdminState>,
    Query(q): Query<OptinQuery>,
    Query(notice): Query<Notice>,
) -> Result<Response, ConsoleError> {
    let page_id = q.page_id.unwrap_or_default().trim().to_owned();
    let login_id = q.login_id.unwrap_or_default().trim().to_owned();
    let mut data = json!({"title": "Opt-in timeline", "page_id": page_id,
                          "login_id": login_id, "notice": notice.text()});
    let mut status = StatusCode::OK;
    if !page_id.is_empty() && !login_id.is_empty() {
        let c = client(&s).await?;
        match operate::timeline(&c, &page_id, &login_id).await? {
            None => {
                status = StatusCode::NOT_FOUND;
                data["missing"] = json!(
                    "No opt-in of that login_id on that page: never recorded, deleted on \
                     request, or pruned after OPTIN_RETENTION_DAYS."
                );
            }
            Some(t) => {
                let steps: Vec<Line> = t
                    .steps
                    .iter()
                    .map(|st| Line {
                        what: serde_json::to_value(st.kind)
                            .ok()
                            .and_then(|v| v.as_str().map(|k| k.replace('_', " ")))
                            .unwrap_or_default(),
                        at: when_precise(st.at),
                        detail: st.detail.clone().unwrap_or_default(),
                    })
                    .collect();
                let events: Vec<Line> = t
                    .events
                    .iter()
                    .map(|e| Line {
                        what: serde_json::to_value(e.kind)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        at: when_precise(e.created_at),
                        detail: match e.published_at {
                            Some(p) => format!("published {}", when_precise(p)),
                            None => "waiting in the outbox".into(),
                        },
                    })
                    .collect();
                let now = OffsetDateTime::now_utc();
                data["optin"] = json!({
                    "state": t.state,
                    "reason": t.failure_reason.map(|r| r.as_str()),
                    "cycle": t.cycle,
                    "source": t.source,
                    "deadline": when(Some(t.deadline)),
                    "left": relative((t.deadline - now).whole_seconds()),
                    "attempts": t.attempts,
                    "message_id": t.message_id,
                    "graph_error": graph_text(t.last_error.as_ref()),
                    "trace_id": t.trace_id,
                    "traceparent": t.traceparent,
                    "window_open": t.state == OptinState::Failed && t.deadline > now,
                    "steps": steps,
                    "events": events,
                });
            }
        }
    }
    render("timeline.html", status, Some(&user), Section::Optin, data)
}
