//! One opt-in's timeline: each step of its life the row records, in time order, and every
//! public event about the person with when it was written and published.

use deadpool_postgres::GenericClient;
use lc_shared::optin::{FailureReason, OptinState};
use lc_shared::telemetry::TraceParent;
use serde::Serialize;
use time::OffsetDateTime;

use super::OperateError;
use super::failures::{GraphError, graph_error};

/// A step of an opt-in's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// The person opted in (Meta's time of the opt-in, or of the login event).
    OptedIn,
    /// The opt-in was recorded (the row was written).
    Received,
    /// A scheduler claimed it for sending (the latest claim).
    Claimed,
    /// The Send API call was about to start (the latest claim's call).
    Called,
    /// Graph accepted the first message, or the opt-in ended without one (the error).
    Answered,
    /// The person's first reply arrived.
    Replied,
    /// The login_id was joined to the person's PSID.
    Linked,
}

/// One step with its time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// What happened.
    pub kind: StepKind,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// A word on it for people (the message id, the failure and Graph's message).
    pub detail: Option<String>,
}

/// The kind of a public event (`docs/asyncapi.yaml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum EventKind {
    /// `identity.linked`.
    #[serde(rename = "identity.linked")]
    IdentityLinked,
    /// `first_message.sent`.
    #[serde(rename = "first_message.sent")]
    FirstMessageSent,
    /// `first_message.failed`.
    #[serde(rename = "first_message.failed")]
    FirstMessageFailed,
    /// `first_message.expired`.
    #[serde(rename = "first_message.expired")]
    FirstMessageExpired,
    /// `identity.deleted`.
    #[serde(rename = "identity.deleted")]
    IdentityDeleted,
    /// A kind this version does not know (written by a newer one).
    #[serde(rename = "other")]
    Other,
}

impl EventKind {
    /// The kind stored in `outbox.event_type`.
    pub fn parse(s: &str) -> Self {
        match s {
            "identity.linked" => Self::IdentityLinked,
            "first_message.sent" => Self::FirstMessageSent,
            "first_message.failed" => Self::FirstMessageFailed,
            "first_message.expired" => Self::FirstMessageExpired,
            "identity.deleted" => Self::IdentityDeleted,
            _ => Self::Other,
        }
    }
}

/// A public event about the person, as the outbox holds it (rows are pruned
/// `OUTBOX_RETENTION_HOURS` after they were published).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEvent {
    /// The CloudEvent `id` (what downstream dedupes on).
    pub event_id: String,
    /// Its kind.
    pub kind: EventKind,
    /// Its `personseq`.
    pub person_seq: Option<i64>,
    /// When it was written (with the state change it announces).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the broker confirmed it; `None` while it waits in the outbox.
    #[serde(with = "time::serde::rfc3339::option")]
    pub published_at: Option<OffsetDateTime>,
}

/// One opt-in's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// The page.
    pub page_id: String,
    /// The login_id.
    pub login_id: String,
    /// The window on this row (1, 2, … after `reset_messenger_state`); the steps are this
    /// cycle's, the events every cycle's.
    pub cycle: i32,
    /// `webhook` or `login_event`.
    pub source: String,
    /// Where it is now.
    pub state: OptinState,
    /// Why it failed, for `failed`.
    pub failure_reason: Option<FailureReason>,
    /// The deadline.
    #[serde(with = "time::serde::rfc3339")]
    pub deadline: OffsetDateTime,
    /// Send API calls made.
    pub attempts: i32,
    /// Graph's message id, once sent.
    pub message_id: Option<String>,
    /// Graph's last error.
    pub last_error: Option<GraphError>,
    /// The W3C trace context the opt-in arrived with.
    pub traceparent: Option<String>,
    /// Its trace id (what logs and the tracing backend show).
    pub trace_id: Option<String>,
    /// The steps, in time order.
    pub steps: Vec<Step>,
    /// The public events about this person, in their order.
    pub events: Vec<TimelineEvent>,
}

const OPTIN_SQL: &str = "SELECT o.cycle, o.source, o.state, o.failure_reason, o.deadline, \
         o.attempts, o.message_id, o.last_error_code, o.last_error_subcode, \
         o.last_error_message, o.last_error_fbtrace, o.traceparent, o.opted_in_at, \
         o.created_at, o.claimed_at, o.call_started_at, o.sent_at, o.finished_at, \
         o.replied_at, l.linked_at \
     FROM optins o LEFT JOIN links l USING (page_id, login_id) \
     WHERE o.page_id = $1 AND o.login_id = $2";

/// Through `outbox_by_person` (V12).
const EVENTS_SQL: &str = "SELECT event_id::text, event_type, person_seq, created_at, published_at \
     FROM outbox WHERE person_key = $1 ORDER BY person_seq NULLS LAST, id";

fn step(kind: StepKind, at: Option<OffsetDateTime>, detail: Option<String>) -> Option<Step> {
    at.map(|at| Step { kind, at, detail })
}

/// The timeline of the opt-in of `login_id` on `page_id`; `None` when there is no such row
/// (never recorded, deleted on request, or pruned after `OPTIN_RETENTION_DAYS`).
pub async fn timeline(
    c: &impl GenericClient,
    page_id: &str,
    login_id: &str,
) -> Result<Option<Timeline>, OperateError> {
    let Some(r) = c.query_opt(OPTIN_SQL, &[&page_id, &login_id]).await? else {
        return Ok(None);
    };
    let state: OptinState = r.try_get(2)?;
    let failure_reason: Option<FailureReason> = r.try_get(3)?;
    let message_id: Option<String> = r.try_get(6)?;
    let last_error = graph_error(&r, 7)?;
    let traceparent: Option<String> = r.try_get(11)?;
    let sent_at: Option<OffsetDateTime> = r.try_get(16)?;
    let finished_at: Option<OffsetDateTime> = r.try_get(17)?;
    let answered = match (sent_at, state) {
        (Some(at), _) => step(
            StepKind::Answered,
            Some(at),
            message_id.as_ref().map(|m| format!("sent, message_id {m}")),
        ),
        (None, OptinState::Failed | OptinState::Expired) => {
            let why = failure_reason.map_or_else(|| state.to_string(), |f| format!("failed: {f}"));
            let said = last_error
                .as_ref()
                .and_then(|e| e.message.as_deref())
                .map(|m| format!(" ({m})"))
                .unwrap_or_default();
            step(
                StepKind::Answered,
                finished_at,
                Some(format!("{why}{said}")),
            )
        }
        _ => None,
    };
    let mut steps: Vec<Step> = [
        step(StepKind::OptedIn, r.try_get(12)?, None),
        step(StepKind::Received, r.try_get(13)?, None),
        step(StepKind::Claimed, r.try_get(14)?, None),
        step(StepKind::Called, r.try_get(15)?, None),
        answered,
        step(StepKind::Replied, r.try_get(18)?, None),
        step(StepKind::Linked, r.try_get(19)?, None),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Stable: steps at the same instant keep the order of a life.
    steps.sort_by_key(|s| s.at);

    let key = lc_shared::events::person_key(page_id, login_id);
    let events = c
        .query(EVENTS_SQL, &[&key])
        .await?
        .iter()
        .map(|e| {
            let kind: String = e.try_get(1)?;
            Ok(TimelineEvent {
                event_id: e.try_get(0)?,
                kind: EventKind::parse(&kind),
                person_seq: e.try_get(2)?,
                created_at: e.try_get(3)?,
                published_at: e.try_get(4)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(Some(Timeline {
        page_id: page_id.to_owned(),
        login_id: login_id.to_owned(),
        cycle: r.try_get(0)?,
        source: r.try_get(1)?,
        state,
        failure_reason,
        deadline: r.try_get(4)?,
        attempts: r.try_get(5)?,
        message_id,
        last_error,
        trace_id: traceparent
            .as_deref()
            .and_then(TraceParent::parse)
            .map(|t| t.trace_id_hex()),
        traceparent,
        steps,
        events,
    }))
}
