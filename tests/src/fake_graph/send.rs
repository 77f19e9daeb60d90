//! The Send API rules of the fake: request shape, scripted and random faults, the 24 h
//! window of a login_id, the one-page rule, success.

use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;

use super::reply::{Reply, TEMPORARY, UNEXPECTED};
use super::server::Incoming;
use super::{FakeResponse, State};

/// Meta's login_id window.
const WINDOW: time::Duration = time::Duration::hours(24);

/// A Send API call from an authenticated page.
pub(super) fn decide_send(state: &mut State, page_id: &str, req: &Incoming) -> Reply {
    let body = req.json();
    let (recipient, login_id) = match validate_send(&body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let scripted = state.global.pop_front().or_else(|| {
        state
            .scripts
            .get_mut(&recipient)
            .and_then(|queue| queue.pop_front())
    });
    let mut delay = Duration::ZERO;
    match scripted {
        Some(FakeResponse::Ok) => return succeed(state, page_id, &recipient, login_id),
        Some(FakeResponse::Error {
            http_status,
            code,
            subcode,
            message,
        }) => return Reply::error(http_status, code, subcode, &message),
        Some(FakeResponse::RateLimited {
            code,
            regain_minutes,
        }) => return Reply::rate_limited(page_id, code, regain_minutes),
        Some(FakeResponse::ServerError(status)) => return Reply::server_error(status),
        Some(FakeResponse::Hang(d)) => delay = d,
        None => {
            if state.failure_rate > 0.0 && state.rng.f64() < state.failure_rate {
                // Graph's own temporary failures, with its error body: a retry is safe. (A bare
                // 5xx from a gateway is not: Graph may have delivered. Script that explicitly.)
                return if state.rng.bool() {
                    Reply::error(503, 1200, None, TEMPORARY)
                } else {
                    Reply::error(500, 2, None, UNEXPECTED)
                };
            }
        }
    }
    let mut reply = normal_send(state, page_id, &recipient, login_id);
    reply.delay += delay;
    reply
}

/// The rules of a real send: window, one page per login_id, then success.
fn normal_send(state: &mut State, page_id: &str, recipient: &str, login_id: bool) -> Reply {
    if login_id {
        if let Some(opted_in_at) = state.optins.get(recipient)
            && OffsetDateTime::now_utc() >= *opted_in_at + WINDOW
        {
            return Reply::error(
                400,
                10,
                Some(2018278),
                "(#10) This message is sent outside of allowed window.",
            );
        }
        if let Some(first) = state.first_page.get(recipient)
            && first != page_id
        {
            // Our model of Meta's one-page rule (the real error is undocumented).
            return Reply::param(
                "(#100) This login_id can only be messaged by the page it was first messaged through",
            );
        }
    }
    succeed(state, page_id, recipient, login_id)
}

fn succeed(state: &mut State, page_id: &str, recipient: &str, login_id: bool) -> Reply {
    let psid = if login_id {
        state
            .first_page
            .entry(recipient.to_owned())
            .or_insert_with(|| page_id.to_owned());
        state
            .psids
            .entry((page_id.to_owned(), recipient.to_owned()))
            // PSIDs are 16-digit numbers. The global generator, not the seeded one, so the
            // failure sequence does not depend on how many sends succeeded.
            .or_insert_with(|| (0..16).map(|_| fastrand::digit(10)).collect())
            .clone()
    } else {
        recipient.to_owned()
    };
    Reply::ok(json!({
        "recipient_id": psid,
        "message_id": format!("m_{}", uuid::Uuid::new_v4().simple()),
    }))
}

/// Checks the body like Graph; returns the recipient key and whether it is a login_id.
fn validate_send(body: &Value) -> Result<(String, bool), Reply> {
    let Some(recipient) = body.get("recipient").filter(|r| r.is_object()) else {
        return Err(Reply::param("(#100) The parameter recipient is required"));
    };
    let key = |name: &str| {
        recipient
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (recipient, is_login_id) = match (key("login_id"), key("id")) {
        (Some(login_id), _) => (login_id, true),
        (None, Some(id)) => (id, false),
        (None, None) => {
            return Err(Reply::param(
                "(#100) Param recipient[id] must be a valid ID string",
            ));
        }
    };
    match body.get("messaging_type").and_then(Value::as_str) {
        None => {
            return Err(Reply::param(
                "(#100) The parameter messaging_type is required",
            ));
        }
        Some("RESPONSE" | "UPDATE" | "MESSAGE_TAG" | "UTILITY") => {}
        Some(other) => {
            return Err(Reply::param(&format!(
                "(#100) Param messaging_type must be one of {{RESPONSE, UPDATE, MESSAGE_TAG, UTILITY}} - got \"{other}\""
            )));
        }
    }
    let Some(message) = body.get("message").filter(|m| m.is_object()) else {
        return Err(Reply::param("(#100) Must send either message or state"));
    };
    let Some(text) = message
        .get("text")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
    else {
        return Err(Reply::param(
            "(#100) Param message[text] must be a non-empty UTF-8 encoded string",
        ));
    };
    if text.chars().count() >= 2000 {
        return Err(Reply::param(
            "(#100) Param message[text] must be a UTF-8 encoded string of less than 2000 characters",
        ));
    }
    if let Some(qrs) = message.get("quick_replies") {
        let Some(qrs) = qrs.as_array().filter(|a| !a.is_empty()) else {
            return Err(Reply::param(
                "(#100) Param message[quick_replies] must be a non-empty array",
            ));
        };
        if qrs.len() > 13 {
            return Err(Reply::param(
                "(#100) Param message[quick_replies] must have at most 13 elements",
            ));
        }
        for (i, qr) in qrs.iter().enumerate() {
            let field = |name: &str, max: usize| {
                qr.get(name)
                    .and_then(Value::as_str)
                    .is_some_and(|s| (1..=max).contains(&s.chars().count()))
            };
            if qr.get("content_type").and_then(Value::as_str) != Some("text") {
                return Err(Reply::param(&format!(
                    "(#100) Param message[quick_replies][{i}][content_type] must be one of {{text, user_phone_number, user_email}}"
                )));
            }
            if !field("title", 20) {
                return Err(Reply::param(&format!(
                    "(#100) Param message[quick_replies][{i}][title] must be a non-empty UTF-8 encoded string of at most 20 characters"
                )));
            }
            if !field("payload", 1000) {
                return Err(Reply::param(&format!(
                    "(#100) Param message[quick_replies][{i}][payload] must be a non-empty UTF-8 encoded string of at most 1000 characters"
                )));
            }
        }
    }
    Ok((recipient, is_login_id))
}
