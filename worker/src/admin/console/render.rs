//! The console's templates, embedded in the binary and rendered with autoescaping (every
//! template is `.html`, which minijinja escapes by default), and its two static files.

use std::sync::LazyLock;

use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use minijinja::Environment;
use minijinja::value::{Serde, Value};
use serde::Serialize;
use time::OffsetDateTime;
use time::macros::format_description;

use super::ConsoleError;
use super::session::ConsoleUser;

/// Every template, by name: compiled in, so the binary needs no file at run time.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("templates/base.html")),
    ("login.html", include_str!("templates/login.html")),
    ("error.html", include_str!("templates/error.html")),
    ("pages.html", include_str!("templates/pages.html")),
    ("token.html", include_str!("templates/token.html")),
    ("at_risk.html", include_str!("templates/at_risk.html")),
    ("failures.html", include_str!("templates/failures.html")),
    ("timeline.html", include_str!("templates/timeline.html")),
    (
        "dead_letters.html",
        include_str!("templates/dead_letters.html"),
    ),
];

/// The stylesheet.
pub const CSS: &str = include_str!("static/console.css");
/// The progressive script (every page works without it).
pub const JS: &str = include_str!("static/console.js");

static ENV: LazyLock<Result<Environment<'static>, minijinja::Error>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, source) in TEMPLATES {
        env.add_template(name, source)?;
    }
    Ok(env)
});

/// Which navigation entry a page belongs to (marked `aria-current`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    /// Pages and their status.
    Pages,
    /// Opt-ins at risk.
    AtRisk,
    /// Recent failures.
    Failures,
    /// One opt-in's timeline.
    Optin,
    /// Dead letters.
    DeadLetters,
    /// Log-in and error pages.
    None,
}

/// What the layout shows of the user (never a token).
#[derive(Serialize)]
struct UserView<'a> {
    name: &'a str,
    scope: &'a str,
    can_write: bool,
    read_only: bool,
    csrf: &'a str,
}

/// Renders `template` with the layout's context and `data` as a response.
pub fn render(
    template: &str,
    status: StatusCode,
    user: Option<&ConsoleUser>,
    section: Section,
    data: impl Serialize,
) -> Result<Response, ConsoleError> {
    let html = render_html(template, user, section, data)?;
    Ok((status, Html(html)).into_response())
}

/// Renders `template` with the layout's context and `data`.
fn render_html(
    template: &str,
    user: Option<&ConsoleUser>,
    section: Section,
    data: impl Serialize,
) -> Result<String, ConsoleError> {
    let env = ENV
        .as_ref()
        .map_err(|e| ConsoleError::Template(e.to_string()))?;
    let user = user.map(|u| UserView {
        name: &u.caller.name,
        scope: u.caller.scope.as_str(),
        can_write: u.can_write,
        read_only: u.read_only,
        csrf: u.csrf.as_deref().unwrap_or(""),
    });
    let ctx = minijinja::context! {
        user => Value::from(Serde(user)),
        section => Value::from(Serde(section)),
        ..Value::from(Serde(data))
    };
    env.get_template(template)
        .and_then(|t| t.render(ctx))
        .map_err(|e| ConsoleError::Template(e.to_string()))
}

/// A static file with its content type; browsers may keep it for an hour.
pub fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// A time as the console shows it: `2026-12-01 03:04:05 UTC` (empty when absent).
pub fn when(t: Option<OffsetDateTime>) -> String {
    let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    t.and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&format).ok())
        .unwrap_or_default()
}

/// A step of a timeline, to the millisecond (`2026-12-01 03:04:05.123 UTC`): received,
/// claimed, called and answered usually fall in the same second, and their order and gaps
/// are what an operator reads the timeline for.
pub fn when_precise(t: OffsetDateTime) -> String {
    let format = format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3] UTC"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(&format)
        .unwrap_or_default()
}

/// A duration in seconds as people read it: `-5 min`, `3 h 20 min`, `42 s`.
pub fn span(seconds: i64) -> String {
    let sign = if seconds < 0 { "-" } else { "" };
    let s = seconds.unsigned_abs();
    match s {
        0..60 => format!("{sign}{s} s"),
        60..3600 => format!("{sign}{} min", s / 60),
        _ => format!("{sign}{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles() {
        assert!(ENV.as_ref().is_ok(), "{:?}", ENV.as_ref().err());
    }

    #[test]
    fn values_are_escaped() {
        let html = render_html(
            "error.html",
            None,
            Section::None,
            serde_json::json!({"title": "t", "message": "<script>alert(1)</script>"}),
        )
        .expect("renders");
        assert!(html.contains("&lt;script&gt;alert(1)"), "{html}");
        assert!(!html.contains("<script>alert"), "{html}");
    }

    #[test]
    fn spans_read_well() {
        assert_eq!(span(42), "42 s");
        assert_eq!(span(-300), "-5 min");
        assert_eq!(span(12_000), "3 h 20 min");
    }

    #[test]
    fn timeline_steps_show_milliseconds() {
        let t = time::macros::datetime!(2026-12-01 03:04:05.1234 UTC);
        assert_eq!(when_precise(t), "2026-12-01 03:04:05.123 UTC");
        assert_eq!(when(Some(t)), "2026-12-01 03:04:05 UTC");
    }
}
