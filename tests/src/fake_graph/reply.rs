//! The fake's answers: Meta's success and error shapes, a bare 5xx, rate-limit headers.

use std::time::Duration;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Graph's code 2 message.
/// Graph's "temporary send message failure" (code 1200), a failure a retry fixes.
pub(super) const TEMPORARY: &str =
    "(#1200) Temporary send message failure. Please try again later.";
pub(super) const UNEXPECTED: &str =
    "An unexpected error has occurred. Please retry your request later.";

/// Graph answers JSON; load balancers in front of it answer HTML.
enum Body {
    Json(Value),
    Html(String),
}

/// The answer, decided; sent after `delay`.
pub(super) struct Reply {
    status: StatusCode,
    body: Body,
    headers: Vec<(&'static str, String)>,
    /// Added latency and hang time.
    pub(super) delay: Duration,
    /// What [`super::RecordedCall::outcome`] records.
    pub(super) outcome: String,
}

impl Reply {
    pub(super) fn ok(body: Value) -> Self {
        Reply {
            status: StatusCode::OK,
            body: Body::Json(body),
            headers: Vec::new(),
            delay: Duration::ZERO,
            outcome: "ok".into(),
        }
    }

    /// Meta's error envelope.
    pub(super) fn error(status: u16, code: i64, subcode: Option<i64>, message: &str) -> Self {
        let fbtrace_id: String = std::iter::repeat_with(fastrand::alphanumeric)
            .take(11)
            .collect();
        let mut error = json!({
            "message": message,
            "type": "OAuthException",
            "code": code,
            "fbtrace_id": fbtrace_id,
        });
        if let Some(sub) = subcode {
            error["error_subcode"] = json!(sub);
        }
        Reply {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            body: Body::Json(json!({ "error": error })),
            headers: Vec::new(),
            delay: Duration::ZERO,
            outcome: match subcode {
                Some(sub) => format!("error:{code}/{sub}"),
                None => format!("error:{code}"),
            },
        }
    }

    pub(super) fn param(message: &str) -> Self {
        Self::error(400, 100, None, message)
    }

    pub(super) fn bad_token() -> Self {
        Self::error(
            400,
            190,
            None,
            "Invalid OAuth access token - Cannot parse access token",
        )
    }

    pub(super) fn server_error(status: u16) -> Self {
        let status = StatusCode::from_u16(status)
            .ok()
            .filter(|s| s.is_server_error())
            .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let reason = status.canonical_reason().unwrap_or("Server Error");
        Reply {
            status,
            body: Body::Html(format!(
                "<html><head><title>{0} {reason}</title></head><body><h1>{0} {reason}</h1></body></html>",
                status.as_u16()
            )),
            headers: Vec::new(),
            delay: Duration::ZERO,
            outcome: format!("error:http{}", status.as_u16()),
        }
    }

    pub(super) fn rate_limited(page_id: &str, code: i64, regain_minutes: u64) -> Self {
        let message = match code {
            4 => "(#4) Application request limit reached",
            17 => "(#17) User request limit reached",
            32 => "(#32) Page request limit reached",
            80006 => {
                "(#80006) There have been too many messages sent to this Messenger user. \
                 Please wait a while before trying again"
            }
            _ => "(#613) Calls to this api have exceeded the rate limit.",
        };
        let usage = json!({ page_id: [{
            "type": "messenger",
            "call_count": 100,
            "total_cputime": 20,
            "total_time": 35,
            "estimated_time_to_regain_access": regain_minutes,
        }]});
        let mut reply = Self::error(400, code, None, message);
        reply
            .headers
            .push(("x-business-use-case-usage", usage.to_string()));
        reply
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Body::Html(html) => (self.status, axum::response::Html(html)).into_response(),
            Body::Json(json) => (self.status, axum::Json(json)).into_response(),
        };
        for (name, value) in self.headers {
            if let Ok(v) = header::HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, v);
            }
        }
        response
    }
}
