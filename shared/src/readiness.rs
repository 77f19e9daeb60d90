//! The answer of every process's `GET /readyz`: one [`Check`] per dependency, with the reason
//! of a failure, and an overall [`Status`] that picks the HTTP status.
//!
//! ```json
//! {"status":"not_ready","checks":{"broker":{"ok":false,"required":true,
//!   "reason":"connection lost: …"},"shutdown":{"ok":true,"required":true}}}
//! ```
//!
//! A *required* check that fails makes the process `not_ready` (`503`): a load balancer or an
//! orchestrator should take it out of service, because it cannot do its job. An *advisory*
//! check that fails makes it `degraded` (`200`): something it depends on is in trouble, but
//! taking this process out of service would not help (every replica sees the same outage) and
//! it still does the part of its job it can. Liveness (`/healthz`) never looks at any of this.
//!
//! Reasons are written for operators and never carry secrets: [`scrub_url_secrets`] removes
//! the passwords of a connection URL from a text before it becomes a reason.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::amqp::BrokerLink;
use crate::shutdown::Shutdown;

/// What a process checks before it says it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckName {
    /// The supervised RabbitMQ link: connected, topology declared.
    Broker,
    /// PostgreSQL: a pooled connection answers.
    Database,
    /// Ingest: the page registry's app bindings (only with `DATABASE_URL`).
    AppBindings,
    /// Workers: every supervised task (consumers, the deletion consumer) runs.
    Tasks,
    /// The scheduler: whether its Graph API calls reach Graph.
    Graph,
    /// The process is not draining for a shutdown.
    Shutdown,
}

/// The overall answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every check passes.
    Ready,
    /// Every required check passes, an advisory one fails (still `200`).
    Degraded,
    /// A required check fails (`503`).
    NotReady,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Whether the dependency is fine.
    pub ok: bool,
    /// Whether a failure makes the process not ready (else it is only degraded).
    pub required: bool,
    /// Why it failed, or a note on a passing check (e.g. no call made yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Check {
    /// A passing required check.
    pub fn pass() -> Self {
        Self {
            ok: true,
            required: true,
            reason: None,
        }
    }

    /// A failing required check, with its reason.
    pub fn fail(reason: impl Into<String>) -> Self {
        Self {
            ok: false,
            required: true,
            reason: Some(reason.into()),
        }
    }

    /// The same check, advisory: its failure only degrades the process.
    #[must_use]
    pub fn advisory(mut self) -> Self {
        self.required = false;
        self
    }

    /// The same check with a note (kept on a passing check too).
    #[must_use]
    pub fn noting(mut self, note: impl Into<String>) -> Self {
        self.reason = Some(note.into());
        self
    }
}

/// Every check of one `/readyz` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Readiness {
    checks: BTreeMap<CheckName, Check>,
}

/// The JSON body: the status first, then the checks.
#[derive(Serialize)]
struct Body<'a> {
    status: Status,
    checks: &'a BTreeMap<CheckName, Check>,
}

impl Readiness {
    /// Adds (or replaces) one check.
    pub fn add(&mut self, name: CheckName, check: Check) -> &mut Self {
        self.checks.insert(name, check);
        self
    }

    /// The check `name`, if it was made.
    pub fn check(&self, name: CheckName) -> Option<&Check> {
        self.checks.get(&name)
    }

    /// The overall status.
    pub fn status(&self) -> Status {
        let failing = self.checks.values().filter(|c| !c.ok);
        let mut status = Status::Ready;
        for check in failing {
            if check.required {
                return Status::NotReady;
            }
            status = Status::Degraded;
        }
        status
    }

    /// `503` when not ready, else `200`.
    pub fn http_status(&self) -> u16 {
        match self.status() {
            Status::NotReady => 503,
            Status::Ready | Status::Degraded => 200,
        }
    }

    /// The JSON body (`{"status": …, "checks": {…}}`), newline-terminated.
    pub fn to_json(&self) -> String {
        let body = Body {
            status: self.status(),
            checks: &self.checks,
        };
        // Serialising plain strings and bools into a String cannot fail; should it ever, the
        // answer still says what the status is.
        let mut text = serde_json::to_string(&body).unwrap_or_else(|e| {
            format!("{{\"status\":\"not_ready\",\"error\":\"cannot serialise checks: {e}\"}}")
        });
        text.push('\n');
        text
    }
}

/// The broker link: connected with the topology declared, else why not.
pub fn broker(link: &BrokerLink) -> Check {
    match link.down_reason() {
        None => Check::pass(),
        Some(reason) => Check::fail(reason),
    }
}

/// Not draining: once a shutdown has begun the process says so first, so a load balancer
/// stops sending before it stops taking work.
pub fn shutdown(stop: &Shutdown) -> Check {
    if stop.is_triggered() {
        Check::fail("shutting down: finishing the work in hand")
    } else {
        Check::pass()
    }
}

/// Replaces every password of `url` (a URL, several comma-separated URLs, or a `key=value`
/// connection string) found in `text` with `***`. Drivers' errors do not echo passwords, but
/// a reason is shown to anyone who can reach `/readyz`, so it is not left to them.
pub fn scrub_url_secrets(text: &str, url: &str) -> String {
    let mut out = text.to_owned();
    for password in url_passwords(url) {
        if password.len() >= 2 && out.contains(&password) {
            out = out.replace(&password, "***");
        }
    }
    out
}

/// The passwords a connection URL carries, raw and percent-decoded.
fn url_passwords(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    if !url.contains("://") {
        for item in url.split_whitespace() {
            if let Some(("password", value)) = item.split_once('=') {
                found.push(value.trim_matches('\'').to_owned());
            }
        }
        return found;
    }
    for one in url.split(',') {
        let rest = one.split_once("://").map_or(one, |(_, rest)| rest);
        let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        if let Some((_, password)) = authority[..at].split_once(':') {
            found.push(password.to_owned());
            let decoded = percent_encoding::percent_decode_str(password)
                .decode_utf8_lossy()
                .into_owned();
            if decoded != password {
                found.push(decoded);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_required_check_is_not_ready_and_an_advisory_one_only_degraded() {
        let mut r = Readiness::default();
        r.add(CheckName::Broker, Check::pass());
        assert_eq!((r.status(), r.http_status()), (Status::Ready, 200));
        r.add(CheckName::Graph, Check::fail("HTTP 502").advisory());
        assert_eq!((r.status(), r.http_status()), (Status::Degraded, 200));
        r.add(CheckName::Database, Check::fail("refused"));
        assert_eq!((r.status(), r.http_status()), (Status::NotReady, 503));
    }

    #[test]
    fn the_body_names_each_check_with_its_reason() {
        let mut r = Readiness::default();
        r.add(CheckName::Broker, Check::pass());
        r.add(CheckName::AppBindings, Check::fail("not read yet"));
        let body: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON");
        assert_eq!(body["status"], "not_ready");
        assert_eq!(body["checks"]["broker"]["ok"], true);
        assert!(body["checks"]["broker"].get("reason").is_none());
        assert_eq!(body["checks"]["app_bindings"]["ok"], false);
        assert_eq!(body["checks"]["app_bindings"]["required"], true);
        assert_eq!(body["checks"]["app_bindings"]["reason"], "not read yet");
    }

    #[test]
    fn passwords_of_every_url_form_are_scrubbed() {
        let text = "cannot reach amqp://app:pa%40ss@h1/v or pa@ss or s3cret-x or kv-pw";
        let url = "amqp://app:pa%40ss@h1/v,amqp://app:s3cret-x@h2/v";
        let out = scrub_url_secrets(text, url);
        assert!(!out.contains("pa%40ss") && !out.contains("pa@ss"), "{out}");
        assert!(!out.contains("s3cret-x"), "{out}");
        let out = scrub_url_secrets(text, "host=db user=lc password=kv-pw");
        assert!(!out.contains("kv-pw"), "{out}");
        assert_eq!(
            scrub_url_secrets("no secret here", "postgres://db/x"),
            "no secret here"
        );
    }
}
