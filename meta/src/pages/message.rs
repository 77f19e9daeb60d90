//! Personalised first messages: a page's named variants, how one is chosen, and rendering.
//!
//! A variant is chosen by the opt-in's `ref` (or `payload`) and its `template` is filled with
//! the variables the business's backend sent with its login event (`{{ first_name }}`). The
//! template language is minijinja's (Jinja2) with *strict* undefined values, so a variable the
//! login event did not carry is an error rather than an empty string, and with no HTML
//! escaping (this is chat text, not markup). Every rendering is checked against Meta's limits
//! before it is sent; whatever goes wrong (a missing variable, a text that came out too long
//! or blank) the variant's plain `default_text` is sent instead and the reason is reported
//! ([`Fallback`]), so a person never receives a broken message.

use std::sync::LazyLock;

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};
use serde::{Deserialize, Serialize};

use super::variables::MessageVariables;
use super::{FirstMessage, MAX_PAYLOAD_CHARS, MAX_TEXT_CHARS, QuickReply, check_quick_replies};

/// Longest variant name (names appear in logs, so they are short identifiers).
pub const MAX_VARIANT_NAME_CHARS: usize = 64;
/// Most variants per page.
pub const MAX_VARIANTS: usize = 50;
/// Longest template source: room for placeholders around a text of Meta's maximum.
pub const MAX_TEMPLATE_CHARS: usize = 4 * MAX_TEXT_CHARS;

/// A named alternative first message, chosen by the opt-in's `ref` or `payload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageVariant {
    /// A short identifier (`[A-Za-z0-9_-]`, unique within the page), named in logs.
    #[serde(default)]
    pub name: String,
    /// The `ref`/`payload` values of an opt-in that choose this variant (exact match).
    #[serde(default)]
    pub refs: Vec<String>,
    /// The text with placeholders, e.g. `Hi {{ first_name }}, thanks for your order!`.
    #[serde(default)]
    pub template: String,
    /// Plain text (no placeholders) sent when the template cannot be rendered within limits.
    #[serde(default)]
    pub default_text: String,
    /// Quick replies of this variant; absent: the page's own (an empty list: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quick_replies: Option<Vec<QuickReply>>,
}

/// The Send API `message` object actually sent:
/// `{"text": .., "quick_replies": [{"content_type": "text", "title": .., "payload": ..}]}`,
/// without `quick_replies` when there are none (Graph rejects an empty array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutgoingMessage {
    /// The text, within Meta's limits.
    pub text: String,
    /// Text quick replies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quick_replies: Vec<QuickReply>,
}

/// Why a variant's `default_text` was sent instead of its rendered template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fallback {
    /// The template uses a variable the opt-in does not carry.
    MissingVariable,
    /// The rendered text is longer than Meta allows.
    TooLong,
    /// The rendered text is empty or only whitespace.
    Empty,
    /// Rendering failed otherwise (an operation on a value of the wrong type, or more work
    /// than [`RENDER_FUEL`] allows).
    RenderError,
}

impl Fallback {
    /// Every reason, for metrics that start at zero.
    pub const ALL: [Self; 4] = [
        Self::MissingVariable,
        Self::TooLong,
        Self::Empty,
        Self::RenderError,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingVariable => "missing_variable",
            Self::TooLong => "too_long",
            Self::Empty => "empty",
            Self::RenderError => "render_error",
        }
    }
}

/// A first message ready to send, and how it was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered<'a> {
    /// What goes to the Send API.
    pub message: OutgoingMessage,
    /// The variant chosen, if any (else the page's own message was used).
    pub variant: Option<&'a str>,
    /// Set when the variant's default text replaced its template, with the reason.
    pub fallback: Option<Fallback>,
}

/// Work one rendering may do (minijinja "fuel", about one unit per instruction): far more
/// than a first message needs, and a bound on a template that loops over its variables, since
/// rendering runs on the scheduler's async workers.
pub const RENDER_FUEL: u64 = 50_000;

/// The one template environment: strict undefined values, no auto-escaping, no loader (a
/// template cannot include files), only the core syntax (minijinja is built without its
/// filter library, macros and multi-template features), and bounded work per rendering.
static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_fuel(Some(RENDER_FUEL));
    env
});

impl FirstMessage {
    /// The page's own message (no variant), as sent.
    pub fn default_message(&self) -> OutgoingMessage {
        OutgoingMessage {
            text: self.text.clone(),
            quick_replies: self.quick_replies.clone(),
        }
    }

    /// The variant an opt-in with this `ref` (or `payload`) chooses, if any.
    pub fn variant_for(&self, message_ref: Option<&str>) -> Option<&MessageVariant> {
        let wanted = message_ref?;
        self.variants
            .iter()
            .find(|v| v.refs.iter().any(|r| r == wanted))
    }

    /// The message for an opt-in: the variant its `message_ref` chooses rendered with
    /// `variables` (its `default_text` when that fails or breaks a limit), else the page's
    /// own message. Never returns a text outside Meta's limits, given a validated page.
    pub fn render(&self, message_ref: Option<&str>, variables: &MessageVariables) -> Rendered<'_> {
        let Some(variant) = self.variant_for(message_ref) else {
            return Rendered {
                message: self.default_message(),
                variant: None,
                fallback: None,
            };
        };
        let quick_replies = variant
            .quick_replies
            .clone()
            .unwrap_or_else(|| self.quick_replies.clone());
        let (text, fallback) = match render_text(&variant.template, variables) {
            Ok(text) => (text, None),
            Err(reason) => (variant.default_text.clone(), Some(reason)),
        };
        Rendered {
            message: OutgoingMessage {
                text,
                quick_replies,
            },
            variant: Some(&variant.name),
            fallback,
        }
    }
}

/// Renders a template and checks the result against Meta's text limits.
fn render_text(template: &str, variables: &MessageVariables) -> Result<String, Fallback> {
    let context = Value::from_object(variables.as_map().clone());
    let text = TEMPLATES
        .render_str(template, context)
        .map_err(|e| match e.kind() {
            ErrorKind::UndefinedError => Fallback::MissingVariable,
            _ => Fallback::RenderError,
        })?;
    if text.trim().is_empty() {
        return Err(Fallback::Empty);
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(Fallback::TooLong);
    }
    Ok(text)
}

/// Checks a page's variants, reporting each problem as (field, what is wrong).
pub(super) fn check_variants(variants: &[MessageVariant], problem: &mut impl FnMut(&str, String)) {
    if variants.len() > MAX_VARIANTS {
        problem(
            "first_message.variants",
            format!(
                "has {} entries; at most {MAX_VARIANTS} are allowed — merge some",
                variants.len()
            ),
        );
    }
    let mut names: Vec<&str> = Vec::new();
    let mut refs: Vec<(&str, &str)> = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        let at = variant_label(v, i);
        let mut field_problem = |field: &str, text: String| problem(&format!("{at}.{field}"), text);
        let name_ok = !v.name.is_empty()
            && v.name.chars().count() <= MAX_VARIANT_NAME_CHARS
            && v.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            field_problem(
                "name",
                format!(
                    "must be 1 to {MAX_VARIANT_NAME_CHARS} characters of letters, digits, `_` \
                     or `-`"
                ),
            );
        } else if names.contains(&v.name.as_str()) {
            field_problem(
                "name",
                "is used by another variant of this page; names must be unique".into(),
            );
        } else {
            names.push(&v.name);
        }
        if v.refs.is_empty() {
            field_problem(
                "refs",
                "is empty, so the variant can never be chosen; list the opt-in `ref` or \
                 `payload` values that choose it"
                    .into(),
            );
        }
        for (j, r) in v.refs.iter().enumerate() {
            let n = r.chars().count();
            if n == 0 || n > MAX_PAYLOAD_CHARS {
                field_problem(
                    &format!("refs[{j}]"),
                    format!("must be 1 to {MAX_PAYLOAD_CHARS} characters"),
                );
            } else if let Some((other, _)) = refs.iter().find(|(_, seen)| *seen == r) {
                field_problem(
                    &format!("refs[{j}]"),
                    format!(
                        "\"{}\" already chooses variant \"{other}\"; a ref may choose only one \
                         variant",
                        r.escape_debug()
                    ),
                );
            } else {
                refs.push((&v.name, r));
            }
        }
        check_template(&v.template, &mut field_problem);
        check_default_text(&v.default_text, &mut field_problem);
        if let Some(quick_replies) = &v.quick_replies {
            check_quick_replies(quick_replies, &format!("{at}.quick_replies"), problem);
        }
    }
}

/// `first_message.variants["name"]`, or by position when the name is empty.
fn variant_label(v: &MessageVariant, index: usize) -> String {
    if v.name.is_empty() {
        format!("first_message.variants[{index}]")
    } else {
        format!("first_message.variants[\"{}\"]", v.name.escape_debug())
    }
}

fn check_template(template: &str, problem: &mut impl FnMut(&str, String)) {
    let n = template.chars().count();
    if template.trim().is_empty() {
        problem(
            "template",
            "missing or empty; give the text with placeholders, e.g. \"Hi {{ first_name }}!\""
                .into(),
        );
    } else if n > MAX_TEMPLATE_CHARS {
        problem(
            "template",
            format!("has {n} characters; at most {MAX_TEMPLATE_CHARS} are allowed"),
        );
    } else if let Err(e) = TEMPLATES.template_from_str(template) {
        problem(
            "template",
            format!("does not parse ({e}); placeholders are written {{{{ name }}}}"),
        );
    }
}

fn check_default_text(text: &str, problem: &mut impl FnMut(&str, String)) {
    let n = text.chars().count();
    if text.trim().is_empty() {
        problem(
            "default_text",
            "missing or empty; give the plain text sent when the template cannot be filled".into(),
        );
    } else if n > MAX_TEXT_CHARS {
        problem(
            "default_text",
            format!(
                "has {n} characters; Meta requires fewer than {} — shorten it",
                MAX_TEXT_CHARS + 1
            ),
        );
    } else if ["{{", "{%", "{#"].iter().any(|m| text.contains(m)) {
        problem(
            "default_text",
            "contains template syntax; it is sent as it is, so write it without placeholders"
                .into(),
        );
    }
}

#[cfg(test)]
mod tests;
