//! The HTTP side of the fake Graph API: routes, authentication, recording. Decisions are made synchronously under the state lock as the call arrives
//! (and recorded at once); only the answer is delayed.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State as AxumState};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use time::OffsetDateTime;

use super::reply::Reply;
use super::send::decide_send;
use super::{FAKE_APP_ID, FakePage, RecordedCall, Shared, State, TokenSource, set_subscription};

/// Larger request bodies are refused; a Send API body is a few kilobytes at most.
const MAX_BODY: usize = 1 << 20;

pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/{version}/{page}/messages", post(messages))
        .route(
            "/{version}/{page}/subscribed_apps",
            get(subscribed_apps).post(subscribe),
        )
        .route("/{version}/me", get(me))
        .fallback(unknown_path)
        .with_state(shared)
}

/// A request as the decision functions see it; the body is read whole (Graph calls are small).
pub(super) struct Incoming {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl<S: Send + Sync> FromRequest<S> for Incoming {
    type Rejection = Response;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, MAX_BODY)
            .await
            .map_err(|e| (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()).into_response())?;
        Ok(Incoming {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body,
        })
    }
}

impl Incoming {
    fn query_pairs(&self) -> Vec<(String, String)> {
        Query::<Vec<(String, String)>>::try_from_uri(&self.uri)
            .map(|q| q.0)
            .unwrap_or_default()
    }

    pub(super) fn query_param(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    fn authorization(&self) -> Option<String> {
        let value = self.headers.get(header::AUTHORIZATION)?;
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    }

    /// The token and where it came from; the header wins, as at Graph.
    fn token(&self) -> Option<(String, TokenSource)> {
        let from_header = self.authorization().and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| (token.trim().to_owned(), TokenSource::Header))
        });
        from_header.or_else(|| {
            self.query_param("access_token")
                .map(|t| (t, TokenSource::Query))
        })
    }

    pub(super) fn json(&self) -> Value {
        if self.body.is_empty() {
            return Value::Null;
        }
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
    }
}

async fn messages(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path((_version, page)): Path<(String, String)>,
    req: Incoming,
) -> Reply {
    respond(&shared, &req, Some(&page), decide_send).await
}

async fn subscribed_apps(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path((_version, page)): Path<(String, String)>,
    req: Incoming,
) -> Reply {
    respond(&shared, &req, Some(&page), |state, page, _| {
        let subscriptions = state
            .pages
            .get(page)
            .map(|p| p.subscriptions.as_slice())
            .unwrap_or_default();
        let data: Vec<Value> = subscriptions
            .iter()
            .map(|s| {
                json!({
                    "category": "Business",
                    "link": format!("https://fake.example/app/{}", s.app_id),
                    "name": format!("Fake app {}", s.app_id),
                    "id": s.app_id,
                    "subscribed_fields": s.subscribed_fields,
                })
            })
            .collect();
        Reply::ok(json!({ "data": data }))
    })
    .await
}

async fn subscribe(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path((_version, page)): Path<(String, String)>,
    req: Incoming,
) -> Reply {
    respond(&shared, &req, Some(&page), |state, page, req| {
        let Some(fields) = req.query_param("subscribed_fields") else {
            return Reply::param("(#100) The parameter subscribed_fields is required");
        };
        let fields: Vec<String> = fields
            .split(',')
            .map(|f| f.trim().to_owned())
            .filter(|f| !f.is_empty())
            .collect();
        if fields.is_empty() {
            return Reply::param("(#100) Param subscribed_fields must be a non-empty list");
        }
        if let Some(p) = state.pages.get_mut(page) {
            set_subscription(p, FAKE_APP_ID, fields);
        }
        Reply::ok(json!({ "success": true }))
    })
    .await
}

async fn me(AxumState(shared): AxumState<Arc<Shared>>, req: Incoming) -> Reply {
    respond(&shared, &req, Some("me"), |_, page, _| {
        Reply::ok(json!({ "id": page, "name": format!("Fake Page {page}") }))
    })
    .await
}

async fn unknown_path(AxumState(shared): AxumState<Arc<Shared>>, req: Incoming) -> Reply {
    respond(&shared, &req, None, |_, _, _| unknown_path_error()).await
}

/// Graph's answer to a path it does not serve.
fn unknown_path_error() -> Reply {
    Reply::error(400, 2500, None, "Unknown path components")
}

/// Authenticates, decides with `decide` (under the lock), records, then answers after the
/// delay. `page_segment` is the page in the path (`me` resolves by token); `None`: a path
/// this fake does not serve.
async fn respond(
    shared: &Shared,
    req: &Incoming,
    page_segment: Option<&str>,
    decide: impl FnOnce(&mut State, &str, &Incoming) -> Reply,
) -> Reply {
    let token = req.token();
    let body = req.json();
    let (reply, is_send) = {
        let mut state = shared.lock();
        let resolved = page_segment.map(|seg| authenticate(&state, seg, req, token.as_ref()));
        let (page_id, mut reply) = match resolved {
            None => (String::new(), unknown_path_error()),
            Some(Err(reply)) => (page_segment.unwrap_or_default().to_owned(), reply),
            Some(Ok(page)) => {
                let reply = decide(&mut state, &page, req);
                (page, reply)
            }
        };
        reply.delay += state.latency;
        let call = RecordedCall {
            at: OffsetDateTime::now_utc(),
            method: req.method.to_string(),
            path: req.uri.path().to_owned(),
            query: req.uri.query().unwrap_or_default().to_owned(),
            page_id,
            authorization: req.authorization(),
            token_source: token.as_ref().map(|(_, source)| *source),
            login_id: body
                .pointer("/recipient/login_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
            body,
            outcome: reply.outcome.clone(),
        };
        // Never the token: the query may hold one, so only the path is logged.
        tracing::info!(
            method = %call.method,
            path = %call.path,
            page_id = %call.page_id,
            login_id = call.login_id.as_deref().unwrap_or("-"),
            token_source = ?call.token_source,
            outcome = %call.outcome,
            "fake Graph call"
        );
        let is_send = call.is_send();
        state.calls.push(call);
        (reply, is_send)
    };
    if is_send {
        shared.send_count.send_modify(|n| *n += 1);
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    reply
}

/// The page the call acts for, or the 190/100 answer.
fn authenticate(
    state: &State,
    segment: &str,
    req: &Incoming,
    token: Option<&(String, TokenSource)>,
) -> Result<String, Reply> {
    let Some((token, _)) = token.filter(|(t, _)| !t.is_empty()) else {
        return Err(Reply::error(
            400,
            190,
            None,
            "An active access token must be used to query information about the current user.",
        ));
    };
    let found: Option<(&String, &FakePage)> = if segment == "me" {
        state.pages.iter().find(|(_, p)| p.token == *token)
    } else {
        state
            .pages
            .get_key_value(segment)
            .filter(|(_, p)| p.token == *token)
    };
    let Some((page_id, page)) = found else {
        return Err(Reply::bad_token());
    };
    if let Some(secret) = &page.app_secret {
        let expected = proof(secret, token);
        match req.query_param("appsecret_proof") {
            None => {
                return Err(Reply::param(
                    "(#100) API calls from the server require an appsecret_proof argument",
                ));
            }
            Some(p) if p != expected => {
                return Err(Reply::param(
                    "(#100) Invalid appsecret_proof provided in the API argument",
                ));
            }
            Some(_) => {}
        }
    }
    Ok(page_id.clone())
}

/// hex(HMAC-SHA256(app secret, token)), computed here rather than with the client's code so
/// the fake checks the client instead of agreeing with it.
fn proof(app_secret: &str, token: &str) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()) else {
        return String::new();
    };
    mac.update(token.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}
