//! The public event contract as tests check it: the JSON Schemas in `docs/schemas/`.
//!
//! Every test that takes an event off `loginconnect.events` runs it through
//! [`Contract::check_delivery`], so the documents and the code cannot drift apart unnoticed.

use std::collections::BTreeMap;
use std::path::PathBuf;

use jsonschema::Validator;
use serde_json::Value;

/// The event kinds (the routing key without its page), each the name of its `data` schema
/// file: the public events, then the operational ones.
pub const KINDS: [&str; 9] = [
    "identity.linked",
    "first_message.sent",
    "first_message.failed",
    "first_message.expired",
    "identity.deleted",
    "page.paused",
    "page.resumed",
    "subscription.lost",
    "subscription.restored",
];

/// Splits a routing key `<kind>.<page_id>` (every kind is two words) into kind and page.
pub fn split_routing_key(routing_key: &str) -> Option<(&str, &str)> {
    let first = routing_key.find('.')?;
    let second = first + 1 + routing_key[first + 1..].find('.')?;
    Some((&routing_key[..second], &routing_key[second + 1..]))
}

/// The directory of the JSON Schemas (`docs/schemas` of the workspace).
pub fn schema_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("docs")
        .join("schemas")
}

/// Reads one schema file as JSON; panics with the path if it is missing or malformed.
pub fn load_schema(file_name: &str) -> Value {
    let path = schema_dir().join(file_name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn compile(file_name: &str) -> Validator {
    let schema = load_schema(file_name);
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{file_name} is not a valid JSON Schema: {e}"))
}

/// Compiled validators of the envelope and of each type's `data`.
pub struct Contract {
    envelope: Validator,
    data: BTreeMap<&'static str, Validator>,
}

impl Default for Contract {
    fn default() -> Self {
        Self::load()
    }
}

impl Contract {
    /// Loads and compiles every schema (panics if one is missing or invalid).
    pub fn load() -> Self {
        Self {
            envelope: compile("cloudevent.json"),
            data: KINDS
                .iter()
                .map(|key| (*key, compile(&format!("{key}.json"))))
                .collect(),
        }
    }

    /// Checks one CloudEvent published with `routing_key` (`<kind>.<page_id>`): the
    /// envelope, that its `type` matches the kind, that the page of the key is its `pageid`
    /// and its `data.page_id`, and its `data`. Returns every violation found.
    pub fn validate(&self, routing_key: &str, event: &Value) -> Result<(), Vec<String>> {
        let mut problems: Vec<String> = self
            .envelope
            .iter_errors(event)
            .map(|e| format!("envelope {}: {e}", e.instance_path()))
            .collect();
        let Some((kind, page)) = split_routing_key(routing_key) else {
            return Err(vec![format!(
                "routing key {routing_key} is not <kind>.<page_id>"
            )]);
        };
        if page.is_empty() || page.contains('.') {
            problems.push(format!(
                "routing key {routing_key}: page {page:?} is not one word"
            ));
        }
        for (what, value) in [
            ("pageid", event.get("pageid")),
            ("data.page_id", event.pointer("/data/page_id")),
        ] {
            if value.and_then(Value::as_str) != Some(page) {
                problems.push(format!(
                    "{what} is {value:?}, expected {page:?} (the routing key's page)"
                ));
            }
        }
        let routing_key = kind;
        let expected_type = format!("com.loginconnect.{routing_key}");
        if event.get("type").and_then(Value::as_str) != Some(expected_type.as_str()) {
            problems.push(format!(
                "type is {:?}, expected {expected_type:?} for routing key {routing_key}",
                event.get("type")
            ));
        }
        match self.data.get(routing_key) {
            Some(validator) => {
                let data = event.get("data").unwrap_or(&Value::Null);
                problems.extend(
                    validator
                        .iter_errors(data)
                        .map(|e| format!("data {}: {e}", e.instance_path())),
                );
            }
            None => problems.push(format!("unknown routing key {routing_key}")),
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// Asserts that `event` satisfies the contract, naming every violation.
    pub fn assert_valid(&self, routing_key: &str, event: &Value) {
        if let Err(problems) = self.validate(routing_key, event) {
            panic!(
                "event violates the contract:\n  {}\nevent: {event:#}",
                problems.join("\n  ")
            );
        }
    }

    /// Checks a message taken off `loginconnect.events`: the body against the schemas, and
    /// the AMQP properties the contract promises (persistent, CloudEvents content type,
    /// `message_id` = CloudEvent `id`, `type` = CloudEvent `type`). Returns the parsed body.
    pub fn check_delivery(&self, delivery: &lapin::message::Delivery) -> Value {
        let routing_key = delivery.routing_key.as_str();
        let body: Value = serde_json::from_slice(&delivery.data)
            .unwrap_or_else(|e| panic!("event body on {routing_key} is not JSON: {e}"));
        self.assert_valid(routing_key, &body);
        let props = &delivery.properties;
        assert_eq!(*props.delivery_mode(), Some(2), "events are persistent");
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some(lc_shared::events::CLOUDEVENTS_CONTENT_TYPE)
        );
        assert_eq!(
            props.message_id().as_ref().map(|m| m.as_str()),
            body.get("id").and_then(Value::as_str),
            "message_id is the CloudEvent id"
        );
        assert_eq!(
            props.kind().as_ref().map(|k| k.as_str()),
            body.get("type").and_then(Value::as_str),
            "AMQP type is the CloudEvent type"
        );
        body
    }
}
