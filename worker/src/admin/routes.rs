//! The admin API's routes: one list ([`ROUTES`]) that builds the router, decides each route's
//! scope, and that the OpenAPI test compares with `docs/openapi.yaml`.

use std::collections::BTreeMap;

use axum::Router;
use axum::routing::{MethodFilter, MethodRouter};

use super::AdminState;
use super::auth::Scope;
use super::handlers as h;
use super::operations as o;

/// An HTTP method the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
}

impl Method {
    /// The lower-case name, as OpenAPI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post",
            Self::Put => "put",
            Self::Patch => "patch",
            Self::Delete => "delete",
        }
    }

    /// The method as `http` spells it.
    pub fn http(self) -> axum::http::Method {
        match self {
            Self::Get => axum::http::Method::GET,
            Self::Post => axum::http::Method::POST,
            Self::Put => axum::http::Method::PUT,
            Self::Patch => axum::http::Method::PATCH,
            Self::Delete => axum::http::Method::DELETE,
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Self::Get => MethodFilter::GET,
            Self::Post => MethodFilter::POST,
            Self::Put => MethodFilter::PUT,
            Self::Patch => MethodFilter::PATCH,
            Self::Delete => MethodFilter::DELETE,
        }
    }
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// List apps.
    ListApps,
    /// Create an app.
    CreateApp,
    /// Read an app.
    GetApp,
    /// List pages.
    ListPages,
    /// Create a page.
    CreatePage,
    /// Read a page.
    GetPage,
    /// Change a page's first message, rate limit or name.
    UpdatePage,
    /// Delete a page.
    DeletePage,
    /// Replace a page's token.
    SetToken,
    /// Pause a page.
    Pause,
    /// Resume a page.
    Resume,
    /// A page's status.
    Status,
    /// One opt-in by page and login_id.
    GetOptin,
    /// A login_id's opt-ins on every page.
    FindOptins,
    /// Links of a page by login_id or PSID.
    FindLinks,
    /// Pending and sending opt-ins, nearest deadline first.
    AtRisk,
    /// Recent failed and expired opt-ins.
    Failures,
    /// One opt-in's timeline.
    Timeline,
    /// Retry a failed opt-in.
    Retry,
    /// List the dead letters.
    ListDeadLetters,
    /// Replay dead letters (a queue, or one message).
    ReplayDeadLetters,
    /// The opt-in funnel per page and day.
    Funnel,
}

/// One route: method, path (OpenAPI/axum syntax), the scope it needs, what it does.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// The method.
    pub method: Method,
    /// The path, `{param}` for parameters.
    pub path: &'static str,
    /// The scope a token needs.
    pub scope: Scope,
    /// The handler.
    pub op: Op,
}

const fn r(method: Method, path: &'static str, scope: Scope, op: Op) -> Route {
    Route {
        method,
        path,
        scope,
        op,
    }
}

/// Every route of the admin API.
pub const ROUTES: &[Route] = &[
    r(Method::Get, "/apps", Scope::Read, Op::ListApps),
    r(Method::Post, "/apps", Scope::Write, Op::CreateApp),
    r(Method::Get, "/apps/{app_id}", Scope::Read, Op::GetApp),
    r(Method::Get, "/pages", Scope::Read, Op::ListPages),
    r(Method::Post, "/pages", Scope::Write, Op::CreatePage),
    r(Method::Get, "/pages/{page_id}", Scope::Read, Op::GetPage),
    r(
        Method::Patch,
        "/pages/{page_id}",
        Scope::Write,
        Op::UpdatePage,
    ),
    r(
        Method::Delete,
        "/pages/{page_id}",
        Scope::Write,
        Op::DeletePage,
    ),
    r(
        Method::Put,
        "/pages/{page_id}/token",
        Scope::Write,
        Op::SetToken,
    ),
    r(
        Method::Post,
        "/pages/{page_id}/pause",
        Scope::Write,
        Op::Pause,
    ),
    r(
        Method::Post,
        "/pages/{page_id}/resume",
        Scope::Write,
        Op::Resume,
    ),
    r(
        Method::Get,
        "/pages/{page_id}/status",
        Scope::Read,
        Op::Status,
    ),
    r(
        Method::Get,
        "/pages/{page_id}/optins/{login_id}",
        Scope::Read,
        Op::GetOptin,
    ),
    r(
        Method::Get,
        "/pages/{page_id}/links",
        Scope::Read,
        Op::FindLinks,
    ),
    r(Method::Get, "/optins", Scope::Read, Op::FindOptins),
    r(Method::Get, "/optins/at-risk", Scope::Read, Op::AtRisk),
    r(Method::Get, "/failures", Scope::Read, Op::Failures),
    r(
        Method::Get,
        "/pages/{page_id}/optins/{login_id}/timeline",
        Scope::Read,
        Op::Timeline,
    ),
    r(
        Method::Post,
        "/pages/{page_id}/optins/{login_id}/retry",
        Scope::Write,
        Op::Retry,
    ),
    r(
        Method::Get,
        "/dead-letters",
        Scope::Read,
        Op::ListDeadLetters,
    ),
    r(
        Method::Post,
        "/dead-letters/{queue}/replay",
        Scope::Write,
        Op::ReplayDeadLetters,
    ),
    r(Method::Get, "/funnel", Scope::Read, Op::Funnel),
];

/// The route serving `method` on the matched `path`.
pub fn find(method: &axum::http::Method, path: &str) -> Option<&'static Route> {
    ROUTES
        .iter()
        .find(|r| r.path == path && r.method.http() == method)
}

fn add(m: MethodRouter<AdminState>, route: &Route) -> MethodRouter<AdminState> {
    let f = route.method.filter();
    match route.op {
        Op::ListApps => m.on(f, h::list_apps),
        Op::CreateApp => m.on(f, h::create_app),
        Op::GetApp => m.on(f, h::get_app),
        Op::ListPages => m.on(f, h::list_pages),
        Op::CreatePage => m.on(f, h::create_page),
        Op::GetPage => m.on(f, h::get_page),
        Op::UpdatePage => m.on(f, h::update_page),
        Op::DeletePage => m.on(f, h::delete_page),
        Op::SetToken => m.on(f, h::set_token),
        Op::Pause => m.on(f, h::pause),
        Op::Resume => m.on(f, h::resume),
        Op::Status => m.on(f, h::status),
        Op::GetOptin => m.on(f, h::get_optin),
        Op::FindOptins => m.on(f, h::find_optins),
        Op::FindLinks => m.on(f, h::find_links),
        Op::AtRisk => m.on(f, o::at_risk),
        Op::Failures => m.on(f, o::failures),
        Op::Timeline => m.on(f, o::timeline),
        Op::Retry => m.on(f, o::retry),
        Op::ListDeadLetters => m.on(f, o::list_dead_letters),
        Op::ReplayDeadLetters => m.on(f, o::replay_dead_letters),
        Op::Funnel => m.on(f, crate::admin::funnel::funnel),
    }
}

/// The router: every route of [`ROUTES`], JSON errors for unknown paths.
pub fn router(state: AdminState) -> Router {
    let mut by_path: BTreeMap<&str, MethodRouter<AdminState>> = BTreeMap::new();
    for route in ROUTES {
        let m = by_path.remove(route.path).unwrap_or_default();
        by_path.insert(route.path, add(m, route));
    }
    let mut app = Router::new();
    for (path, m) in by_path {
        app = app.route(path, m);
    }
    app.nest("/console", super::console::router())
        .fallback(h::not_found)
        .method_not_allowed_fallback(h::method_not_allowed)
        .with_state(state)
}
