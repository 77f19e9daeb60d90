//! The console's forms that change something: log-in and log-out, and the write actions.
//!
//! Every write is a `POST` form carrying the session's CSRF token, checked with the scope
//! and the read-only setting by [`ConsoleUser::check_write`] before anything is done; then
//! the same library operation as the admin API's runs (logged there with the token's name)
//! and the browser is sent back to the page it came from with a notice (post/redirect/get,
//! so a reload never repeats a write).

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use lc_meta::secret::Secret;
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use super::ConsoleError;
use super::render::{Section, render};
use super::session::{self, ConsoleUser};
use super::views::{Done, client};
use crate::admin::AdminState;
use crate::operate::{self, RetryOutcome};
use crate::registry::ops;

/// `?expired=1` on the log-in form.
#[derive(Debug, Default, Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    expired: Option<u8>,
}

/// `GET /console/login`.
pub async fn login_form(Query(q): Query<LoginQuery>) -> Result<Response, ConsoleError> {
    let notice = q.expired.map(|_| "Your session has expired; log in again.");
    render(
        "login.html",
        StatusCode::OK,
        None,
        Section::None,
        json!({"title": "Log in", "notice": notice}),
    )
}

/// The log-in form's fields.
#[derive(Deserialize)]
pub struct LoginInput {
    token: Option<Secret>,
}

/// `POST /console/login`: a configured token opens a session; any other gets the form
/// again, `401`, without the token echoed.
pub async fn login(State(s): State<AdminState>, Form(input): Form<LoginInput>) -> Response {
    let presented = input.token.as_ref().map_or("", |t| t.expose().trim());
    match session::open(&s.tokens, presented, OffsetDateTime::now_utc()) {
        Some((caller, value)) => {
            tracing::info!(actor = %caller.name, scope = caller.scope.as_str(), "admin console: logged in");
            (
                [(
                    header::SET_COOKIE,
                    session::set_cookie(&value, s.console.https),
                )],
                Redirect::to("/console/pages"),
            )
                .into_response()
        }
        None => {
            tracing::warn!("admin console: log-in refused (not a token of ADMIN_TOKENS)");
            let error = if presented.is_empty() {
                "Paste a token of ADMIN_TOKENS."
            } else {
                "That token is not one of ADMIN_TOKENS; check the token you were given."
            };
            render(
                "login.html",
                StatusCode::UNAUTHORIZED,
                None,
                Section::None,
                json!({"title": "Log in", "error": error}),
            )
            .unwrap_or_else(IntoResponse::into_response)
        }
    }
}

/// `POST /console/logout`: the cookie is cleared (the session is signed, not stored, so
/// there is nothing to delete server-side; rotating the token ends every session).
pub async fn logout(State(s): State<AdminState>) -> Response {
    (
        [(header::SET_COOKIE, session::clear_cookie(s.console.https))],
        Redirect::to("/console/login"),
    )
        .into_response()
}

/// A write form with only its CSRF token.
#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

/// Back to `to` with the notice of `done` about `subject`.
pub fn done(to: &str, done: Done, subject: &str) -> Response {
    let kind = serde_json::to_value(done)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let join = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!(
        "{to}{join}done={kind}&subject={}",
        query_escape(subject)
    ))
    .into_response()
}

/// `s` percent-encoded for a query value (unreserved characters kept).
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `POST /console/pages/{page_id}/pause`.
pub async fn pause(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Path(page_id): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, ConsoleError> {
    user.check_write(&f.csrf)?;
    let mut c = client(&s).await?;
    ops::pause(&mut c, &user.caller.name, &page_id).await?;
    Ok(done("/console/pages", Done::Paused, &page_id))
}

/// `POST /console/pages/{page_id}/resume`.
pub async fn resume(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Path(page_id): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Result<Response, ConsoleError> {
    user.check_write(&f.csrf)?;
    let mut c = client(&s).await?;
    ops::resume(&mut c, &user.caller.name, &page_id).await?;
    Ok(done("/console/pages", Done::Resumed, &page_id))
}

/// The token form's fields.
#[derive(Deserialize)]
pub struct TokenInput {
    #[serde(default)]
    csrf: String,
    access_token: Option<Secret>,
}

/// `POST /console/pages/{page_id}/token`: stores the token encrypted; it is never shown
/// back, not even in an error.
pub async fn set_token(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Path(page_id): Path<String>,
    Form(f): Form<TokenInput>,
) -> Result<Response, ConsoleError> {
    user.check_write(&f.csrf)?;
    let token = f.access_token.ok_or_else(|| {
        ConsoleError::Invalid("the form has no token; paste the page access token".into())
    })?;
    let mut c = client(&s).await?;
    ops::set_token(&mut c, &s.keys, &user.caller.name, &page_id, &token).await?;
    Ok(done("/console/pages", Done::TokenReplaced, &page_id))
}

/// The retry form's fields.
#[derive(Deserialize)]
pub struct RetryInput {
    #[serde(default)]
    csrf: String,
    page_id: String,
    login_id: String,
}

/// `POST /console/optin/retry`: a failed opt-in back to pending while its window is open,
/// when [`operate::retry`] finds it safe (never after an unknown outcome); its refusal says
/// why otherwise.
pub async fn retry(
    user: ConsoleUser,
    State(s): State<AdminState>,
    Form(f): Form<RetryInput>,
) -> Result<Response, ConsoleError> {
    user.check_write(&f.csrf)?;
    let c = client(&s).await?;
    let outcome = operate::retry(
        &c,
        &user.caller.name,
        &f.page_id,
        &f.login_id,
        s.retry_margin,
    )
    .await?;
    match outcome {
        RetryOutcome::Retried => Ok(done(
            &super::optins::timeline_href(&f.page_id, &f.login_id),
            Done::Retried,
            &f.login_id,
        )),
        RetryOutcome::NotFound => Err(ConsoleError::NotFound(format!(
            "no opt-in of that login_id on page {}: it may have been pruned or deleted",
            f.page_id
        ))),
        RetryOutcome::Refused(why) => Err(ConsoleError::Refused(format!(
            "not retried: {}",
            why.explain()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_escaped_in_the_redirect() {
        assert_eq!(query_escape("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(query_escape("123-x_y.z~"), "123-x_y.z~");
    }
}
