//! What a failed Graph call asks of the caller: [`classify`] by status, code and subcode into
//! a [`FailureClass`], and the [`GraphFailure`] that carries everything Graph said.

use std::fmt;
use std::time::Duration;

use super::usage::Usage;

/// What the caller should do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The request provably did not take effect (a refused connection, a 408) or Graph said
    /// its error is temporary (codes 2, 1200, …): retry with backoff.
    Transient,
    /// Graph's code 1, "unknown error", which missing permissions can also cause: Meta's
    /// advice is to retry once with backoff, then treat it as permanent
    /// ([`FailureClass::attempt_limit`]).
    TransientOnce,
    /// A rate limit of this page (or of its users/business): retry after `retry_after` if
    /// given, else with a longer backoff.
    RateLimited,
    /// Code 4, the app's request limit: the throttling applies to every page of the app, so
    /// the caller slows all of them down, not only this one; retry as for `RateLimited`.
    AppThrottled,
    /// Code 10/1893063, the page is temporarily restricted from sending: every send of the
    /// page would fail alike, so the caller pauses the page (and alerts) instead of failing
    /// its opt-ins one by one, until an operator who checked the Page resumes it.
    PageRestricted,
    /// Retrying cannot help (bad recipient, window closed, permission, config). Also used
    /// where the message may already have been sent, so a blind retry risks a duplicate.
    Permanent,
    /// The page token is invalid or expired: pause the page and alert, don't burn attempts.
    TokenInvalid,
    /// A code this table does not know: retry a bounded number of times.
    Unknown,
    /// The request may have reached Graph but no usable answer came back (a timeout or a
    /// connection lost after sending, a 5xx without a Graph error body from a gateway in
    /// front of Graph, a success without a message id): the message may have been sent, so
    /// a retry could message the person twice. The caller's policy decides.
    OutcomeUnknown,
}

impl FailureClass {
    /// Every class, for pre-registering metric labels.
    pub const ALL: [FailureClass; 9] = [
        Self::Transient,
        Self::TransientOnce,
        Self::RateLimited,
        Self::AppThrottled,
        Self::PageRestricted,
        Self::Permanent,
        Self::TokenInvalid,
        Self::Unknown,
        Self::OutcomeUnknown,
    ];

    /// A stable lower-case name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Transient => "transient",
            Self::TransientOnce => "transient_once",
            Self::RateLimited => "rate_limited",
            Self::AppThrottled => "app_throttled",
            Self::PageRestricted => "page_restricted",
            Self::Permanent => "permanent",
            Self::TokenInvalid => "token_invalid",
            Self::Unknown => "unknown",
            Self::OutcomeUnknown => "outcome_unknown",
        }
    }

    /// The most attempts of one opt-in (the first one included) that Meta's advice allows
    /// when the last failure was of this class; `None` leaves the bound to the caller's own
    /// settings. Only [`FailureClass::TransientOnce`] has one: 2, the first try and one retry.
    /// The count is of all attempts, whatever failed before, because a retry budget per error
    /// code would need a history the caller does not keep.
    pub fn attempt_limit(self) -> Option<u32> {
        match self {
            Self::TransientOnce => Some(2),
            _ => None,
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed Graph call, with everything Graph said about it.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphFailure {
    /// What to do next.
    pub class: FailureClass,
    /// The HTTP status; `None` when no response arrived (network error, timeout).
    pub http_status: Option<u16>,
    /// Graph's `error.code`.
    pub code: Option<i64>,
    /// Graph's `error.error_subcode`.
    pub subcode: Option<i64>,
    /// Graph's `error.message`, or a description of the failure; never contains the token.
    pub message: String,
    /// Graph's `error.fbtrace_id`, for Meta support.
    pub fbtrace_id: Option<String>,
    /// How long Graph asks us to wait: `Retry-After`, else the usage headers'
    /// `estimated_time_to_regain_access`.
    pub retry_after: Option<Duration>,
    /// The usage headers of the answer, when one came with any.
    pub usage: Option<Usage>,
}

impl fmt::Display for GraphFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Graph call failed ({}", self.class)?;
        if let Some(s) = self.http_status {
            write!(f, ", HTTP {s}")?;
        }
        if let Some(c) = self.code {
            write!(f, ", code {c}")?;
            if let Some(s) = self.subcode {
                write!(f, "/{s}")?;
            }
        }
        write!(f, "): {}", self.message)?;
        if let Some(t) = &self.fbtrace_id {
            write!(f, " [fbtrace_id {t}]")?;
        }
        Ok(())
    }
}

impl std::error::Error for GraphFailure {}

impl GraphFailure {
    /// A failure without a Graph error body.
    pub(super) fn local(
        class: FailureClass,
        http_status: Option<u16>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            class,
            http_status,
            code: None,
            subcode: None,
            message: message.into(),
            fbtrace_id: None,
            retry_after: None,
            usage: None,
        }
    }
}

/// Classifies a Graph answer by Meta's Send API error reference (code, subcode and what each
/// asks of the caller), as the match below spells it out.
///
/// `code` wins over the HTTP status (Graph's advice: branch on code/subcode). Without a
/// code, by the status:
///
/// | status | class | why |
/// | --- | --- | --- |
/// | none | `Transient` | only used for "never sent" (a refused connection); `call` decides timeouts itself |
/// | 408 | `Transient` | the server gave up *waiting for* the request, so it did not process it |
/// | 429 | `RateLimited` | |
/// | 5xx | `OutcomeUnknown` | a gateway's 502/504 can come after Graph sent the message |
/// | other | `Unknown` | |
///
/// With a code (Meta's table; the match below is the reference):
///
/// | code – subcode | class |
/// | --- | --- |
/// | 1 – 1357046 | `OutcomeUnknown` (messages may have been sent) |
/// | 1 (other) | `TransientOnce` (retry once, then permanent) |
/// | 2 – 2018344 | `Permanent` |
/// | 2, 1200, 2018321 | `Transient` |
/// | 4 – 2018354 | `Permanent` |
/// | 4 – 2018022 | `RateLimited` (per page) |
/// | 4 (other) | `AppThrottled` (the app's limit, all pages) |
/// | 613 – 2018338 / 1893016 | `Permanent` |
/// | 17, 32, 341, 368, 613, 80006 | `RateLimited` |
/// | 190 | `TokenInvalid` |
/// | 10 – 1893063 | `PageRestricted` |
/// | 10, 100, 200–299, 551, 2018300, 2022 | `Permanent` |
/// | anything else | `Unknown` |
pub fn classify(http_status: Option<u16>, code: Option<i64>, subcode: Option<i64>) -> FailureClass {
    use FailureClass::*;
    let Some(code) = code else {
        return match http_status {
            // A 408 says the server timed out waiting for the request: it was not processed.
            None | Some(408) => Transient,
            Some(429) => RateLimited,
            // No Graph error body: a gateway (load balancer, proxy) answered, and a 502/504
            // can come after Graph already sent the message. A retry could send it twice.
            Some(500..=599) => OutcomeUnknown,
            Some(_) => Unknown,
        };
    };
    match (code, subcode) {
        // "Received invalid JSON reply": the message may have gone out; reconcile, don't retry.
        (1, Some(1357046)) => OutcomeUnknown,
        // Unknown error, which missing permissions also cause: one retry, then permanent.
        (1, _) => TransientOnce,
        // Custom labels terms not accepted: a configuration problem.
        (2, Some(2018344)) => Permanent,
        (2 | 1200 | 2018321, _) => Transient,
        // Marketing-message frequency: skipping is the only option.
        (4, Some(2018354)) => Permanent,
        // Sends to phone numbers of this page (legacy): a per-page limit.
        (4, Some(2018022)) => RateLimited,
        // The app's request limit: throttling every page of the app helps, one page doesn't.
        (4, _) => AppThrottled,
        // Tag abuse warning / duplicate marketing opt-in: retrying makes it worse.
        (613, Some(2018338 | 1893016)) => Permanent,
        (17 | 32 | 341 | 368 | 613 | 80006, _) => RateLimited,
        (190, _) => TokenInvalid,
        // The page may not send for a while: every opt-in of the page would fail alike.
        (10, Some(1893063)) => PageRestricted,
        (10 | 100 | 200..=299 | 551 | 2018300 | 2022, _) => Permanent,
        _ => Unknown,
    }
}
