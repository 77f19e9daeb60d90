//! The `PAGES_FILE`: the pages this deployment messages for, their tokens and first messages.
//!
//! The file is TOML with one `[[pages]]` table per page (format in the README, "The pages
//! file"). It is
//! validated once at start-up against Meta's Send API limits so that a bad file stops the
//! process with a message naming the page and the field, instead of every opt-in failing
//! later with a Graph error 100. Tokens may be given inline or, better, as the name of an
//! environment variable; [`PagesConfig::parse`] takes the environment as a function so the
//! rules are testable without touching the process environment.
//!
//! No error text ever contains a token or an app secret: errors name the field or the
//! environment variable, never the value.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::secret::Secret;

pub mod message;
pub mod variables;

pub use message::{Fallback, MessageVariant, OutgoingMessage, Rendered};
pub use variables::{MessageVariables, VariablesError};

/// Meta: `message.text` "must be UTF-8 and less than 2000 characters".
pub const MAX_TEXT_CHARS: usize = 1999;
/// Meta: at most 13 quick replies per message.
pub const MAX_QUICK_REPLIES: usize = 13;
/// Meta: a quick reply title is at most 20 characters.
pub const MAX_TITLE_CHARS: usize = 20;
/// Meta: a quick reply payload is at most 1000 characters.
pub const MAX_PAYLOAD_CHARS: usize = 1000;

/// Every page of the deployment, validated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PagesConfig {
    /// The pages, in file order; ids are unique.
    pub pages: Vec<PageConfig>,
}

/// One page: its id, the token its messages are sent with, and its first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageConfig {
    /// The Facebook Page id (digits only).
    pub id: String,
    /// The page access token (resolved from `access_token_env` when given that way).
    pub access_token: Secret,
    /// The app secret, when the app requires `appsecret_proof` on Graph calls.
    pub app_secret: Option<Secret>,
    /// The initial message sent to every person who opts in through this page.
    pub first_message: FirstMessage,
}

/// The initial message of a page: its own text and quick replies, and named variants.
///
/// Serializes to (and deserializes from) the same shape the pages file uses, so it can be
/// stored as JSON — the page registry stores it and the admin API takes it; without variants
/// that is exactly the Send API `message` object
/// (`{"text": .., "quick_replies": [{"content_type": "text", "title": .., "payload": ..}]}`).
/// What is sent is an [`OutgoingMessage`] ([`FirstMessage::render`]). Every field has a
/// default so older files and stored JSON stay valid; [`FirstMessage::check`] applies the
/// rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstMessage {
    /// The message text (1 to 1999 characters), sent when no variant is chosen.
    #[serde(default)]
    pub text: String,
    /// Up to 13 text quick replies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quick_replies: Vec<QuickReply>,
    /// Personalised alternatives chosen by the opt-in's `ref`/`payload` (see [`message`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<MessageVariant>,
}

impl FirstMessage {
    /// Checks the message against Meta's Send API limits (as the pages file is checked), for
    /// messages that come from elsewhere (the admin API, the registry). Every problem is
    /// listed, labelled with `page`.
    pub fn validate(&self, page: &str) -> Result<(), Vec<PageProblem>> {
        let problems = self.check(page);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// A text quick reply button.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "RawQuickReply")]
pub struct QuickReply {
    /// The button label (1 to 20 characters).
    pub title: String,
    /// What comes back in the reply's `quick_reply.payload` (1 to 1000 characters).
    pub payload: String,
}

impl Serialize for QuickReply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // `content_type` is not configurable: only text quick replies make sense for a first
        // message, so it is added here rather than carried in the struct.
        let mut s = serializer.serialize_struct("QuickReply", 3)?;
        s.serialize_field("content_type", "text")?;
        s.serialize_field("title", &self.title)?;
        s.serialize_field("payload", &self.payload)?;
        s.end()
    }
}

// A quick reply as written: missing fields become empty (and get our own error, naming the
// page); `content_type` is accepted because stored JSON carries it, but only as "text".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuickReply {
    #[serde(default)]
    title: String,
    #[serde(default)]
    payload: String,
    content_type: Option<String>,
}

impl TryFrom<RawQuickReply> for QuickReply {
    type Error = String;

    fn try_from(raw: RawQuickReply) -> Result<Self, Self::Error> {
        match raw.content_type.as_deref() {
            None | Some("text") => Ok(Self {
                title: raw.title,
                payload: raw.payload,
            }),
            Some(_) => Err("quick reply `content_type` must be text (or left out)".into()),
        }
    }
}

impl FirstMessage {
    /// Every problem of this message against Meta's limits and the variant rules, for the
    /// page labelled `page` (e.g. `page "1234"`); empty when it is valid.
    pub fn check(&self, page: &str) -> Vec<PageProblem> {
        let mut problems = Vec::new();
        check_message(self, &mut |field: &str, problem: String| {
            problems.push(PageProblem {
                page: page.to_owned(),
                field: field.to_owned(),
                problem,
            });
        });
        problems
    }
}

/// One thing wrong with one page of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageProblem {
    /// `page "1234"`, or `page #2` when the id is missing (1-based position in the file).
    pub page: String,
    /// The field, e.g. `first_message.quick_replies[3].title`.
    pub field: String,
    /// What is wrong and what to do about it.
    pub problem: String,
}

impl fmt::Display for PageProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}, field `{}`: {}", self.page, self.field, self.problem)
    }
}

/// Why the pages file cannot be used. Texts name the file, the page and the field.
#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    /// The file could not be read.
    #[error("cannot read pages file {file}: {source}; set PAGES_FILE to a readable TOML file")]
    Read {
        /// The path given.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has a key this format does not know (a typo).
    #[error(
        "pages file {file}: {location}: {message}; fix the TOML (keys allowed in [[pages]]: id, \
         access_token, access_token_env, app_secret, app_secret_env, first_message; in \
         [pages.first_message]: text, quick_replies, variants; in a quick reply: title, \
         payload; in a variant: name, refs, template, default_text, quick_replies)"
    )]
    Syntax {
        /// The path given.
        file: String,
        /// `line L, column C` and, inside a `[[pages]]` table, which one (`page #N`).
        location: String,
        /// The parser's message, with quoted values removed (they could be secrets).
        message: String,
    },
    /// The file has no `[[pages]]` table.
    #[error("pages file {file}: no [[pages]] table; add one per page this deployment sends for")]
    Empty {
        /// The path given.
        file: String,
    },
    /// One or more pages break a rule; all problems are listed, one per line.
    #[error("pages file {file} is invalid:{}", list(problems))]
    Invalid {
        /// The path given.
        file: String,
        /// Every problem found, in file order.
        problems: Vec<PageProblem>,
    },
}

fn list(problems: &[PageProblem]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

// The file as written. Everything optional so that a missing field gets our own error (with
// the page id) rather than serde's; `deny_unknown_fields` everywhere so typos are caught.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    pages: Vec<RawPage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPage {
    id: Option<String>,
    access_token: Option<Secret>,
    access_token_env: Option<String>,
    app_secret: Option<Secret>,
    app_secret_env: Option<String>,
    first_message: Option<FirstMessage>,
}

/// The label `parse` uses for the file in its errors (it has no path).
const PARSE_ORIGIN: &str = "PAGES_FILE";

impl PagesConfig {
    /// Reads, parses, resolves `*_env` fields from the process environment, and validates.
    pub fn load(path: &Path) -> Result<Self, PagesError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PagesError::Read {
            file: file.clone(),
            source,
        })?;
        parse_from(&text, &file, &|name| std::env::var(name).ok())
    }

    /// Parses and validates TOML text; `env` resolves `access_token_env`/`app_secret_env`.
    pub fn parse(
        toml_text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, PagesError> {
        parse_from(toml_text, PARSE_ORIGIN, env)
    }

    /// The page with this id.
    pub fn get(&self, page_id: &str) -> Option<&PageConfig> {
        self.pages.iter().find(|p| p.id == page_id)
    }
}

fn parse_from(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<PagesConfig, PagesError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| syntax_error(text, file, &e))?;
    if raw.pages.is_empty() {
        return Err(PagesError::Empty {
            file: file.to_owned(),
        });
    }
    let mut problems = Vec::new();
    let mut pages = Vec::with_capacity(raw.pages.len());
    // First position of each id, to name both pages of a duplicate.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (index, raw_page) in raw.pages.into_iter().enumerate() {
        let label = page_label(raw_page.id.as_deref(), index);
        if let Some(id) = raw_page.id.as_deref().filter(|id| !id.is_empty()) {
            if let Some(first) = seen.get(id) {
                problems.push(PageProblem {
                    page: label.clone(),
                    field: "id".into(),
                    problem: format!(
                        "duplicate page id, already used by page #{}; keep one table per page",
                        first + 1
                    ),
                });
            } else {
                seen.insert(id.to_owned(), index);
            }
        }
        if let Some(page) = validate_page(raw_page, &label, env, &mut problems) {
            pages.push(page);
        }
    }
    if problems.is_empty() {
        Ok(PagesConfig { pages })
    } else {
        Err(PagesError::Invalid {
            file: file.to_owned(),
            problems,
        })
    }
}

fn page_label(id: Option<&str>, index: usize) -> String {
    match id {
        Some(id) if !id.is_empty() => format!("page \"{id}\""),
        _ => format!("page #{}", index + 1),
    }
}

/// Checks one page, pushing every problem; returns the page only when it had none.
fn validate_page(
    raw: RawPage,
    label: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<PageProblem>,
) -> Option<PageConfig> {
    let before = problems.len();
    let mut problem = |field: &str, text: String| {
        problems.push(PageProblem {
            page: label.to_owned(),
            field: field.to_owned(),
            problem: text,
        });
    };

    let id = raw.id.unwrap_or_default();
    if id.is_empty() {
        problem(
            "id",
            "missing or empty; set it to the Facebook Page id (digits)".into(),
        );
    } else if !id.bytes().all(|b| b.is_ascii_digit()) {
        problem(
            "id",
            "must contain only digits (a Facebook Page id, as a string), not a name or URL".into(),
        );
    } else if let Err(e) = crate::ids::check_page_id(&id) {
        // Digits only, but too long to be a word of a routing key.
        problem("id", e.to_string());
    }

    let access_token = resolve_secret(
        "access_token",
        raw.access_token,
        raw.access_token_env,
        true,
        env,
        &mut problem,
    );
    let app_secret = resolve_secret(
        "app_secret",
        raw.app_secret,
        raw.app_secret_env,
        false,
        env,
        &mut problem,
    );

    let first_message = match raw.first_message {
        None => {
            problem(
                "first_message",
                "missing; add a [pages.first_message] table with `text`".into(),
            );
            None
        }
        Some(m) => {
            check_message(&m, &mut problem);
            Some(m)
        }
    };

    if problems.len() > before {
        return None;
    }
    Some(PageConfig {
        id,
        access_token: access_token?,
        app_secret,
        first_message: first_message?,
    })
}

/// Resolves `<field>` / `<field>_env`: exactly one when `required`, at most one otherwise.
///
/// Values are trimmed because tokens copied into files or env vars often carry a trailing
/// newline, which would make an invalid `Authorization` header.
fn resolve_secret(
    field: &str,
    inline: Option<Secret>,
    env_name: Option<String>,
    required: bool,
    env: &dyn Fn(&str) -> Option<String>,
    problem: &mut impl FnMut(&str, String),
) -> Option<Secret> {
    let env_field = format!("{field}_env");
    match (inline, env_name) {
        (Some(_), Some(_)) => {
            problem(
                field,
                format!(
                    "both `{field}` and `{env_field}` are set; keep only one (prefer `{env_field}`)"
                ),
            );
            None
        }
        (None, None) => {
            if required {
                problem(
                    field,
                    format!(
                        "missing; set `{env_field}` to the name of the environment variable \
                         holding it (or `{field}` inline)"
                    ),
                );
            }
            None
        }
        (Some(value), None) => {
            let value = value.expose().trim();
            if value.is_empty() {
                problem(
                    field,
                    format!("is empty; give the value or use `{env_field}`"),
                );
                None
            } else {
                Some(Secret::new(value))
            }
        }
        (None, Some(name)) => {
            let name = name.trim();
            if name.is_empty() {
                problem(
                    &env_field,
                    "is empty; give the name of the environment variable holding the value".into(),
                );
                return None;
            }
            match env(name).map(|v| v.trim().to_owned()) {
                Some(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    problem(
                        &env_field,
                        format!(
                            "environment variable {name} is not set or empty; export it before \
                             starting (it holds the {field})"
                        ),
                    );
                    None
                }
            }
        }
    }
}

fn check_message(m: &FirstMessage, problem: &mut impl FnMut(&str, String)) {
    let text_chars = m.text.chars().count();
    if m.text.trim().is_empty() {
        problem(
            "first_message.text",
            "missing or empty; Meta requires a non-empty text".into(),
        );
    } else if text_chars > MAX_TEXT_CHARS {
        problem(
            "first_message.text",
            format!(
                "has {text_chars} characters; Meta requires fewer than {} — shorten it",
                MAX_TEXT_CHARS + 1
            ),
        );
    }
    check_quick_replies(&m.quick_replies, "first_message.quick_replies", problem);
    message::check_variants(&m.variants, problem);
}

/// Checks a list of quick replies whose field is `field` (e.g. `first_message.quick_replies`).
fn check_quick_replies(
    quick_replies: &[QuickReply],
    field: &str,
    problem: &mut impl FnMut(&str, String),
) {
    if quick_replies.len() > MAX_QUICK_REPLIES {
        problem(
            field,
            format!(
                "has {} entries; Meta allows at most {MAX_QUICK_REPLIES} — remove some",
                quick_replies.len()
            ),
        );
    }
    for (i, qr) in quick_replies.iter().enumerate() {
        let checks = [
            ("title", &qr.title, MAX_TITLE_CHARS),
            ("payload", &qr.payload, MAX_PAYLOAD_CHARS),
        ];
        for (name, value, max) in checks {
            let n = value.chars().count();
            if n == 0 || n > max {
                let what = if n == 0 {
                    "missing or empty".to_owned()
                } else {
                    format!("has {n} characters")
                };
                problem(
                    &format!("{field}[{i}].{name}"),
                    format!("{what}; Meta requires 1 to {max} characters"),
                );
            }
        }
    }
}

fn syntax_error(text: &str, file: &str, e: &toml::de::Error) -> PagesError {
    let location = match e.span() {
        Some(span) => {
            let offset = span.start.min(text.len());
            let before = text.get(..offset).unwrap_or("");
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            // Which `[[pages]]` table the error is in, so the operator can find it.
            let tables = before
                .lines()
                .filter(|l| l.trim_start().starts_with("[[pages]]"))
                .count();
            if tables > 0 {
                format!("line {line}, column {column} (in page #{tables})")
            } else {
                format!("line {line}, column {column}")
            }
        }
        None => "somewhere".to_owned(),
    };
    PagesError::Syntax {
        file: file.to_owned(),
        location,
        message: redact_quoted(e.message().trim()),
    }
}

/// Replaces the content of every `"..."` in a parser message: serde quotes the offending
/// value ("invalid type: string \"EAAG...\""), which may be a token.
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for c in message.chars() {
        if c == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(c);
        }
    }
    if inside {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests;
