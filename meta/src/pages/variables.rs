//! The variables a business's backend sends with its login event to fill a first message's
//! placeholders (`{"first_name": "Ada", "product": "Blue kettle"}`).
//!
//! They are personal data, so they are bounded here once for every place that handles them:
//! ingest refuses a login event whose variables break a bound (`400` naming which), and the
//! scheduler reads stored variables through the same rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most variables in one login event.
pub const MAX_VARIABLES: usize = 20;
/// Longest variable name.
pub const MAX_VARIABLE_NAME_CHARS: usize = 64;
/// Longest variable value (a name, a product, an order number…).
pub const MAX_VARIABLE_VALUE_CHARS: usize = 500;

/// Validated string variables: names are identifiers usable in a template, values are
/// bounded text without control characters (a line break is allowed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct MessageVariables(BTreeMap<String, String>);

/// Why a set of variables is refused; the text names the variable and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VariablesError {
    /// Not a JSON object.
    #[error("`variables` must be a JSON object of strings, e.g. {{\"first_name\": \"Ada\"}}")]
    NotAnObject,
    /// Too many entries.
    #[error("`variables` has {0} entries; at most {MAX_VARIABLES} are allowed")]
    TooMany(usize),
    /// A name that is not an identifier, or too long.
    #[error(
        "variable name \"{0}\" is invalid: use 1 to {MAX_VARIABLE_NAME_CHARS} letters, digits or \
         `_`, not starting with a digit"
    )]
    BadName(String),
    /// A value that is not a string.
    #[error("variable `{0}` must be a string")]
    NotAString(String),
    /// A value that is too long.
    #[error(
        "variable `{name}` has {chars} characters; at most {MAX_VARIABLE_VALUE_CHARS} are allowed"
    )]
    TooLong {
        /// The variable.
        name: String,
        /// Its length in characters.
        chars: usize,
    },
    /// A value with a control character other than a line break.
    #[error("variable `{0}` contains a control character; only line breaks are allowed")]
    ControlCharacter(String),
}

impl MessageVariables {
    /// Validates a JSON value (an object of strings).
    pub fn from_json(value: &Value) -> Result<Self, VariablesError> {
        let object = value.as_object().ok_or(VariablesError::NotAnObject)?;
        let mut map = BTreeMap::new();
        for (name, value) in object {
            let Value::String(text) = value else {
                check_name(name)?;
                return Err(VariablesError::NotAString(name.clone()));
            };
            map.insert(name.clone(), text.clone());
        }
        Self::try_from(map)
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The variables by name.
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

fn check_name(name: &str) -> Result<(), VariablesError> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    let ok = first_ok
        && name.len() <= MAX_VARIABLE_NAME_CHARS
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        // Shown to the caller: cut, so a huge name does not make a huge answer.
        Err(VariablesError::BadName(
            name.chars()
                .take(MAX_VARIABLE_NAME_CHARS)
                .collect::<String>()
                .escape_debug()
                .to_string(),
        ))
    }
}

impl TryFrom<BTreeMap<String, String>> for MessageVariables {
    type Error = VariablesError;

    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        if map.len() > MAX_VARIABLES {
            return Err(VariablesError::TooMany(map.len()));
        }
        for (name, value) in &map {
            check_name(name)?;
            let chars = value.chars().count();
            if chars > MAX_VARIABLE_VALUE_CHARS {
                return Err(VariablesError::TooLong {
                    name: name.clone(),
                    chars,
                });
            }
            if value.chars().any(|c| c.is_control() && c != '\n') {
                return Err(VariablesError::ControlCharacter(name.clone()));
            }
        }
        Ok(Self(map))
    }
}

impl From<MessageVariables> for BTreeMap<String, String> {
    fn from(v: MessageVariables) -> Self {
        v.0
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn accepts_bounded_string_variables() {
        let v = MessageVariables::from_json(&json!({"first_name": "Ada", "_x1": "line\nbreak"}))
            .expect("valid");
        assert_eq!(
            v.as_map().get("first_name").map(String::as_str),
            Some("Ada")
        );
        assert!(
            MessageVariables::from_json(&json!({}))
                .expect("empty")
                .is_empty()
        );
    }

    #[test]
    fn refuses_what_breaks_a_bound_naming_it() {
        let e = |v: Value| MessageVariables::from_json(&v).expect_err("refused");
        assert_eq!(e(json!(["a"])), VariablesError::NotAnObject);
        assert_eq!(e(json!({"n": 1})), VariablesError::NotAString("n".into()));
        assert!(matches!(e(json!({"1st": "x"})), VariablesError::BadName(_)));
        assert!(matches!(
            e(json!({"first-name": "x"})),
            VariablesError::BadName(_)
        ));
        assert!(matches!(e(json!({"": "x"})), VariablesError::BadName(_)));
        let long_name = "a".repeat(MAX_VARIABLE_NAME_CHARS + 1);
        assert!(matches!(
            e(json!({ long_name: "x" })),
            VariablesError::BadName(_)
        ));
        let long = "é".repeat(MAX_VARIABLE_VALUE_CHARS + 1);
        assert_eq!(
            e(json!({ "p": long })),
            VariablesError::TooLong {
                name: "p".into(),
                chars: MAX_VARIABLE_VALUE_CHARS + 1
            }
        );
        assert_eq!(
            e(json!({"p": "a\u{0}b"})),
            VariablesError::ControlCharacter("p".into())
        );
        let many: serde_json::Map<String, Value> = (0..=MAX_VARIABLES)
            .map(|i| (format!("v{i}"), json!("x")))
            .collect();
        assert_eq!(
            e(Value::Object(many)),
            VariablesError::TooMany(MAX_VARIABLES + 1)
        );
        assert!(e(json!({"bad name": "x"})).to_string().contains("bad name"));
    }

    #[test]
    fn serde_round_trip_validates() {
        let v = MessageVariables::from_json(&json!({"a": "b"})).expect("valid");
        let text = serde_json::to_string(&v).expect("json");
        assert_eq!(text, r#"{"a":"b"}"#);
        assert_eq!(
            serde_json::from_str::<MessageVariables>(&text).expect("back"),
            v
        );
        assert!(serde_json::from_str::<MessageVariables>(r#"{"a b":"c"}"#).is_err());
    }
}
