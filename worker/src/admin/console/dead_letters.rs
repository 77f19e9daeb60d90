//! The console's dead letters: every inspectable queue with its depth and first messages
//! (listed without removing them), and replay of one message by its id or of a whole queue,
//! through [`crate::operate::dead_letters`] as the CLI and the admin API do.

use axum::Form;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use lc_shared::amqp::AmqpEndpoint;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::ConsoleError;
use super::actions::done;
use super::render::{Section, render};
use super::session::ConsoleUser;
use super::views::{Done, Notice};
use crate::admin::AdminState;
use crate::operate::dead_letters::{self, DeadLetterError};

/// Messages listed per queue.
const LISTED: usize = 20;
/// How deep a replay looks: whole-queue replays take at most this many, a replay by id
/// looks this far for the message.
const REPLAY_LIMIT: usize = 1000;
/// How the console's connections are named in the broker's UI.
const CLIENT: &str = "loginconnect-admin-console";

impl From<DeadLetterError> for ConsoleError {
    fn from(e: DeadLetterError) -> Self {
        match e {
            DeadLetterError::UnknownQueue { .. } => Self::Invalid(e.to_string()),
            other => {
                tracing::warn!(error = %other, "admin console: broker error");
                Self::Unavailable(
                    "RabbitMQ did not answer; try again, and check the AMQP_URL given to \
                     `loginconnect admin` and the broker's health if it persists"
                        .into(),
                )
            }
        }
    }
}

fn endpoint(s: &AdminState) -> Result<&AmqpEndpoint, ConsoleError> {
    s.amqp.as_ref().ok_or_else(|| {
        ConsoleError::Unavailable(
            "dead letters need the broker: start `loginconnect admin` with AMQP_URL".into(),
        )
    })
}

/// One message as the table shows it.
#[derive(Serialize)]
struct Row {
    message_id: String,
    reason: String,
    origin: String,
    routing_key: String,
    preview: String,
}

/// One queue as the page shows it.
#[derive(Serialize)]
struct QueueView {
    /// The table's id: the queue's name with `-` for `.`.
    table_id: String,
    queue: String,
    depth: u32,
    rows: Vec<Row>,
}

/// `GET /console/dead-letters`.
pub async fn list(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Query(notice): Query<Notice>,
) -> Result<Response, ConsoleError> {
    let listings = dead_letters::list(endpoint(&s)?, CLIENT, None, LISTED).await?;
    let queues: Vec<QueueView> = listings
        .into_iter()
        .map(|l| QueueView {
            rows: l
                .messages
                .into_iter()
                .map(|m| Row {
                    message_id: m.message_id.unwrap_or_default(),
                    reason: m.reason.unwrap_or_default(),
                    origin: m.origin_queue.unwrap_or_default(),
                    routing_key: m.routing_key,
                    preview: m.preview,
                })
                .collect(),
            table_id: format!("dlq-{}", l.queue.replace('.', "-")),
            queue: l.queue,
            depth: l.depth,
        })
        .collect();
    render(
        "dead_letters.html",
        StatusCode::OK,
        Some(&user),
        Section::DeadLetters,
        json!({"title": "Dead letters", "queues": queues, "listed": LISTED,
               "limit": REPLAY_LIMIT, "notice": notice.text()}),
    )
}

/// The replay form's fields: a queue, and a message id for one message.
#[derive(Deserialize)]
pub struct ReplayInput {
    #[serde(default)]
    csrf: String,
    queue: String,
    #[serde(default)]
    message_id: String,
}

/// `POST /console/dead-letters/replay`.
pub async fn replay(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Form(f): Form<ReplayInput>,
) -> Result<Response, ConsoleError> {
    user.check_write(&f.csrf)?;
    dead_letters::known_queue(&f.queue)?;
    let endpoint = endpoint(&s)?;
    let id = f.message_id.trim();
    let report = if id.is_empty() {
        dead_letters::replay(endpoint, CLIENT, &f.queue, REPLAY_LIMIT).await?
    } else {
        dead_letters::replay_one(endpoint, CLIENT, &f.queue, id, REPLAY_LIMIT).await?
    };
    tracing::info!(
        actor = %user.caller.name,
        queue = %f.queue,
        replayed = report.replayed,
        kept = report.kept,
        "admin console: dead letters replayed"
    );
    if report.found == Some(false) {
        return Err(ConsoleError::NotFound(format!(
            "no message {id} in the first {REPLAY_LIMIT} of {}; it may have been replayed \
             already (reload the list)",
            f.queue
        )));
    }
    let subject = if id.is_empty() {
        format!(
            "{} message(s) of {} ({} kept)",
            report.replayed, f.queue, report.kept
        )
    } else {
        format!("message {id} of {}", f.queue)
    };
    Ok(done("/console/dead-letters", Done::Replayed, &subject))
}
