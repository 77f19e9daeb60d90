//! The admin API's handlers: each authenticates the caller (the scope comes from the route
//! list), calls one registry operation, and answers JSON. Errors are JSON too:
//! `{"error": {"code": .., "message": ..}}`, the message saying what to fix.

use axum::Json;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use lc_meta::secret::Secret;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::AdminState;
use super::auth::Caller;
use super::routes;
use crate::registry::lookup::{self, LinkKey};
use crate::registry::model::{NewApp, NewPage, PageUpdate};
use crate::registry::{RegistryError, ops};

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error answer with this status, code and message.
    pub(super) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        let mut response = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"loginconnect-admin\""),
            );
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let (status, code) = match &e {
            RegistryError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            RegistryError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            RegistryError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            RegistryError::Keys(_) => (StatusCode::INTERNAL_SERVER_ERROR, "token_keys"),
            RegistryError::Db(_) | RegistryError::Pool(_) | RegistryError::Store(_) => {
                tracing::warn!(error = %e, "admin API: database error");
                (StatusCode::SERVICE_UNAVAILABLE, "database")
            }
        };
        Self::new(status, code, e.to_string())
    }
}

/// A handler's answer: a JSON body or a JSON error.
pub(super) type Answer = Result<Response, ApiError>;

/// A JSON answer with `status`.
pub(super) fn ok<T: serde::Serialize>(status: StatusCode, body: T) -> Answer {
    Ok((status, Json(body)).into_response())
}

/// The credentials of `Bearer <token>` (the scheme is case-insensitive, RFC 9110).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

impl FromRequestParts<AdminState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AdminState,
    ) -> Result<Self, Self::Rejection> {
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .map(str::trim)
            .filter(|t| !t.is_empty());
        let Some(presented) = presented else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "no bearer token: send `Authorization: Bearer <token>` with a token of \
                 ADMIN_TOKENS",
            ));
        };
        let caller = state.tokens.identify(presented).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the bearer token is not one of ADMIN_TOKENS; check the token you were given",
            )
        })?;
        let path = parts
            .extensions
            .get::<MatchedPath>()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let route = routes::find(&parts.method, &path)
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route"))?;
        if !caller.scope.allows(route.scope) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token {:?} has scope `{}`; {} {} needs `{}`: use a token with that scope",
                    caller.name,
                    caller.scope.as_str(),
                    route.method.as_str().to_uppercase(),
                    route.path,
                    route.scope.as_str()
                ),
            ));
        }
        Ok(caller)
    }
}

/// A JSON body whose rejection is a JSON error naming the problem.
pub struct Body<T>(T);

impl<T: DeserializeOwned> FromRequest<AdminState> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AdminState) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!(
                    "{}; see docs/openapi.yaml for the request body",
                    e.body_text()
                ),
            )),
        }
    }
}

/// A connection from the admin's pool (503 naming the cause when none comes).
pub(super) async fn client(state: &AdminState) -> Result<deadpool_postgres::Object, ApiError> {
    state
        .pool
        .get()
        .await
        .map_err(|e| ApiError::from(RegistryError::Pool(e)))
}

/// `GET /apps`.
pub async fn list_apps(_: Caller, State(s): State<AdminState>) -> Answer {
    let c = client(&s).await?;
    ok(StatusCode::OK, json!({"apps": ops::apps(&c).await?}))
}

/// `POST /apps`.
pub async fn create_app(
    who: Caller,
    State(s): State<AdminState>,
    Body(new): Body<NewApp>,
) -> Answer {
    let c = client(&s).await?;
    ok(
        StatusCode::CREATED,
        ops::create_app(&c, &who.name, &new).await?,
    )
}

/// `GET /apps/{app_id}`.
pub async fn get_app(_: Caller, State(s): State<AdminState>, Path(app_id): Path<String>) -> Answer {
    let c = client(&s).await?;
    ok(StatusCode::OK, ops::app(&c, &app_id).await?)
}

/// `GET /pages`.
pub async fn list_pages(_: Caller, State(s): State<AdminState>) -> Answer {
    let c = client(&s).await?;
    ok(StatusCode::OK, json!({"pages": ops::pages(&c).await?}))
}

/// `POST /pages`.
pub async fn create_page(
    who: Caller,
    State(s): State<AdminState>,
    Body(new): Body<NewPage>,
) -> Answer {
    let c = client(&s).await?;
    ok(
        StatusCode::CREATED,
        ops::create_page(&c, &who.name, &new).await?,
    )
}

/// `GET /pages/{page_id}`.
pub async fn get_page(_: Caller, State(s): State<AdminState>, Path(page): Path<String>) -> Answer {
    let c = client(&s).await?;
    ok(StatusCode::OK, ops::page(&c, &page).await?)
}

/// `PATCH /pages/{page_id}`.
pub async fn update_page(
    who: Caller,
    State(s): State<AdminState>,
    Path(page): Path<String>,
    Body(update): Body<PageUpdate>,
) -> Answer {
    let c = client(&s).await?;
    ok(
        StatusCode::OK,
        ops::update_page(&c, &who.name, &page, &update).await?,
    )
}

/// `DELETE /pages/{page_id}`.
pub async fn delete_page(
    who: Caller,
    State(s): State<AdminState>,
    Path(page): Path<String>,
) -> Answer {
    let mut c = client(&s).await?;
    ops::delete_page(&mut c, &who.name, &page).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The body of `PUT /pages/{page_id}/token`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenInput {
    access_token: Secret,
}

/// `PUT /pages/{page_id}/token`.
pub async fn set_token(
    who: Caller,
    State(s): State<AdminState>,
    Path(page): Path<String>,
    Body(input): Body<TokenInput>,
) -> Answer {
    let mut c = client(&s).await?;
    let key_id = ops::set_token(&mut c, &s.keys, &who.name, &page, &input.access_token).await?;
    ok(
        StatusCode::OK,
        json!({"page_id": page, "stored": true, "key_id": key_id}),
    )
}

/// `POST /pages/{page_id}/pause`.
pub async fn pause(who: Caller, State(s): State<AdminState>, Path(page): Path<String>) -> Answer {
    let mut c = client(&s).await?;
    ok(StatusCode::OK, ops::pause(&mut c, &who.name, &page).await?)
}

/// `POST /pages/{page_id}/resume`.
pub async fn resume(who: Caller, State(s): State<AdminState>, Path(page): Path<String>) -> Answer {
    let mut c = client(&s).await?;
    ok(StatusCode::OK, ops::resume(&mut c, &who.name, &page).await?)
}

/// `GET /pages/{page_id}/status`.
pub async fn status(_: Caller, State(s): State<AdminState>, Path(page): Path<String>) -> Answer {
    let c = client(&s).await?;
    ok(StatusCode::OK, ops::status(&c, &page).await?)
}

/// `GET /pages/{page_id}/optins/{login_id}`.
pub async fn get_optin(
    _: Caller,
    State(s): State<AdminState>,
    Path((page, login_id)): Path<(String, String)>,
) -> Answer {
    let c = client(&s).await?;
    match lookup::optin_of(&c, &page, &login_id).await? {
        Some(o) => ok(StatusCode::OK, o),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no opt-in of that login_id on page {page} (finished opt-ins are pruned after OPTIN_RETENTION_DAYS)"
            ),
        )),
    }
}

/// Query of `GET /optins`.
#[derive(Deserialize)]
pub struct OptinQuery {
    login_id: Option<String>,
}

/// `GET /optins?login_id=`.
pub async fn find_optins(
    _: Caller,
    State(s): State<AdminState>,
    Query(q): Query<OptinQuery>,
) -> Answer {
    let Some(login_id) = q.login_id.filter(|l| !l.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "give `login_id` in the query: GET /optins?login_id=...",
        ));
    };
    let c = client(&s).await?;
    ok(
        StatusCode::OK,
        json!({"optins": lookup::optins_of(&c, &login_id).await?}),
    )
}

/// Query of `GET /pages/{page_id}/links`.
#[derive(Deserialize)]
pub struct LinkQuery {
    login_id: Option<String>,
    psid: Option<String>,
}

/// `GET /pages/{page_id}/links?login_id=|psid=`.
pub async fn find_links(
    _: Caller,
    State(s): State<AdminState>,
    Path(page): Path<String>,
    Query(q): Query<LinkQuery>,
) -> Answer {
    let key = match (q.login_id.as_deref(), q.psid.as_deref()) {
        (Some(l), None) if !l.is_empty() => LinkKey::LoginId(l),
        (None, Some(p)) if !p.is_empty() => LinkKey::Psid(p),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "give exactly one of `login_id` or `psid` in the query",
            ));
        }
    };
    let c = client(&s).await?;
    ok(
        StatusCode::OK,
        json!({"links": lookup::links(&c, &page, key).await?}),
    )
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; docs/openapi.yaml lists the routes",
    )
}

/// A known path with another method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this path does not take that method; docs/openapi.yaml lists the routes",
    )
}
