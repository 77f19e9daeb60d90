//! Variant choice, rendering with its fallbacks, and the variant rules of the pages file.

use serde_json::json;

use super::super::{PagesConfig, PagesError};
use super::*;

fn env(name: &str) -> Option<String> {
    (name == "PAGE_TOKEN").then(|| "EAAG-token".to_owned())
}

/// A page whose first message has `variants` (TOML `[[pages.first_message.variants]]` tables).
fn pages_file(variants: &str) -> String {
    format!(
        "[[pages]]\nid = \"42\"\naccess_token_env = \"PAGE_TOKEN\"\n\
         [pages.first_message]\ntext = \"Welcome!\"\n\
         quick_replies = [{{ title = \"Help\", payload = \"HELP\" }}]\n{variants}"
    )
}

const ORDER: &str = r#"
[[pages.first_message.variants]]
name = "order"
refs = ["checkout", "42"]
template = "Hi {{ first_name }}, thanks for buying {{ product }}!"
default_text = "Thanks for your order!"

[[pages.first_message.variants]]
name = "newsletter"
refs = ["news"]
template = "Hello {{ first_name }}"
default_text = "Hello!"
quick_replies = []
"#;

fn message() -> FirstMessage {
    let cfg = PagesConfig::parse(&pages_file(ORDER), &env).expect("valid");
    cfg.pages[0].first_message.clone()
}

fn vars(v: serde_json::Value) -> MessageVariables {
    MessageVariables::from_json(&v).expect("variables")
}

fn problems(variants: &str) -> String {
    match PagesConfig::parse(&pages_file(variants), &env) {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(e @ PagesError::Invalid { .. }) => e.to_string(),
        Err(e) => panic!("expected Invalid, got {e}"),
    }
}

#[test]
fn variant_is_chosen_by_ref_or_payload_value() {
    let m = message();
    assert_eq!(
        m.variant_for(Some("checkout")).map(|v| v.name.as_str()),
        Some("order")
    );
    // A numeric payload arrives as its digits.
    assert_eq!(
        m.variant_for(Some("42")).map(|v| v.name.as_str()),
        Some("order")
    );
    assert_eq!(
        m.variant_for(Some("news")).map(|v| v.name.as_str()),
        Some("newsletter")
    );
    assert!(
        m.variant_for(Some("Checkout")).is_none(),
        "exact match only"
    );
    assert!(m.variant_for(None).is_none());
}

#[test]
fn renders_the_chosen_variant_with_the_variables() {
    let m = message();
    let r = m.render(
        Some("checkout"),
        &vars(json!({"first_name": "Ada", "product": "a <blue> kettle & lid"})),
    );
    assert_eq!(r.variant, Some("order"));
    assert_eq!(r.fallback, None);
    // No HTML escaping: this is chat text.
    assert_eq!(
        r.message.text,
        "Hi Ada, thanks for buying a <blue> kettle & lid!"
    );
    // No quick replies of its own: the page's.
    assert_eq!(r.message.quick_replies, m.quick_replies);
    // An explicit empty list: none.
    let n = m.render(Some("news"), &vars(json!({"first_name": "Bo"})));
    assert_eq!(n.message.text, "Hello Bo");
    assert!(n.message.quick_replies.is_empty());
}

#[test]
fn no_ref_or_unknown_ref_sends_the_page_message() {
    let m = message();
    for r in [None, Some("other")] {
        let out = m.render(r, &vars(json!({"first_name": "Ada"})));
        assert_eq!(out.variant, None);
        assert_eq!(out.fallback, None);
        assert_eq!(out.message, m.default_message());
    }
}

#[test]
fn missing_variable_falls_back_to_the_default_text() {
    let m = message();
    let r = m.render(Some("checkout"), &vars(json!({"first_name": "Ada"})));
    assert_eq!(r.fallback, Some(Fallback::MissingVariable));
    assert_eq!(r.message.text, "Thanks for your order!");
    assert_eq!(r.variant, Some("order"));
    let none = m.render(Some("checkout"), &MessageVariables::default());
    assert_eq!(none.fallback, Some(Fallback::MissingVariable));
}

#[test]
fn too_long_or_blank_rendering_falls_back() {
    let mut m = message();
    m.variants[0].template = "{{ a }}{{ a }}{{ a }}{{ a }}{{ a }}".into();
    let long = "x".repeat(400); // 5 × 400 = 2000 > 1999
    let r = m.render(Some("checkout"), &vars(json!({ "a": long })));
    assert_eq!(r.fallback, Some(Fallback::TooLong));
    assert_eq!(r.message.text, "Thanks for your order!");
    let fits = "x".repeat(399);
    let ok = m.render(Some("checkout"), &vars(json!({ "a": fits })));
    assert_eq!(ok.fallback, None);
    assert_eq!(ok.message.text.chars().count(), 1995);
    let blank = m.render(Some("checkout"), &vars(json!({"a": " "})));
    assert_eq!(blank.fallback, Some(Fallback::Empty));
}

#[test]
fn render_errors_fall_back() {
    let mut m = message();
    // Attribute access on a string: not a missing variable, still never sent broken.
    m.variants[0].template = "{{ a.b.c }}".into();
    let r = m.render(Some("checkout"), &vars(json!({"a": "x"})));
    assert!(r.fallback.is_some());
    assert_eq!(r.message.text, "Thanks for your order!");
}

#[test]
fn runaway_templates_are_stopped_and_fall_back() {
    let mut m = message();
    // 500 × 500 × 500 iterations: stopped by the fuel bound, not run to the end.
    m.variants[0].template =
        "{% for a in p %}{% for b in p %}{% for c in p %}.{% endfor %}{% endfor %}{% endfor %}"
            .into();
    let started = std::time::Instant::now();
    let r = m.render(Some("checkout"), &vars(json!({"p": "x".repeat(500)})));
    assert_eq!(r.fallback, Some(Fallback::RenderError));
    assert_eq!(r.message.text, "Thanks for your order!");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

#[test]
fn variants_round_trip_through_json() {
    let m = message();
    let value = serde_json::to_value(&m).expect("json");
    assert_eq!(value["variants"][0]["refs"], json!(["checkout", "42"]));
    assert!(value["variants"][0].get("quick_replies").is_none());
    assert_eq!(value["variants"][1]["quick_replies"], json!([]));
    let back: FirstMessage = serde_json::from_value(value).expect("back");
    assert_eq!(back, m);
    // JSON stored before variants existed (the Send API shape) still reads.
    let old: FirstMessage = serde_json::from_value(json!({"text": "Hi", "quick_replies": [
        {"content_type": "text", "title": "Yes", "payload": "Y"}]}))
    .expect("old shape");
    assert!(old.variants.is_empty());
    assert!(old.check("page \"1\"").is_empty());
    let bad: Result<FirstMessage, _> = serde_json::from_value(
        json!({"text": "Hi", "quick_replies": [{"content_type": "user_email"}]}),
    );
    assert!(bad.is_err());
}

#[test]
fn check_names_page_variant_and_field() {
    let m = FirstMessage {
        text: "Hi".into(),
        variants: vec![MessageVariant {
            name: "v".into(),
            refs: vec!["r".into()],
            template: "{{ oops".into(),
            default_text: String::new(),
            quick_replies: None,
        }],
        ..FirstMessage::default()
    };
    let p = m.check("page \"7\"");
    let text: Vec<String> = p.iter().map(ToString::to_string).collect();
    assert_eq!(p.len(), 2, "{text:?}");
    assert!(text[0].contains("page \"7\"") && text[0].contains("variants[\"v\"].template"));
    assert!(text[1].contains("variants[\"v\"].default_text"), "{text:?}");
}

#[test]
fn default_text_must_fit_and_be_plain() {
    let long = "y".repeat(MAX_TEXT_CHARS + 1);
    let e = problems(&format!(
        "[[pages.first_message.variants]]\nname = \"a\"\nrefs = [\"r\"]\ntemplate = \"Hi\"\n\
         default_text = \"{long}\"\n"
    ));
    assert!(e.contains("page \"42\""), "{e}");
    assert!(
        e.contains("first_message.variants[\"a\"].default_text"),
        "{e}"
    );
    assert!(e.contains("2000"), "{e}");
    let e = problems(
        "[[pages.first_message.variants]]\nname = \"a\"\nrefs = [\"r\"]\ntemplate = \"Hi\"\n\
         default_text = \"Hi {{ name }}\"\n",
    );
    assert!(
        e.contains("default_text") && e.contains("template syntax"),
        "{e}"
    );
}

#[test]
fn templates_must_parse() {
    let e = problems(
        "[[pages.first_message.variants]]\nname = \"a\"\nrefs = [\"r\"]\n\
         template = \"Hi {{ first_name \"\ndefault_text = \"Hi\"\n",
    );
    assert!(e.contains("first_message.variants[\"a\"].template"), "{e}");
    assert!(e.contains("does not parse"), "{e}");
}

#[test]
fn names_and_refs_are_unique_and_present() {
    let e = problems(
        "[[pages.first_message.variants]]\nname = \"a\"\nrefs = [\"r\"]\ntemplate = \"x\"\n\
         default_text = \"x\"\n\
         [[pages.first_message.variants]]\nname = \"a\"\nrefs = [\"r\"]\ntemplate = \"y\"\n\
         default_text = \"y\"\n\
         [[pages.first_message.variants]]\nname = \"bad name\"\nrefs = []\ntemplate = \"y\"\n\
         default_text = \"y\"\n",
    );
    assert!(e.contains("names must be unique"), "{e}");
    assert!(e.contains("already chooses variant \"a\""), "{e}");
    assert!(e.contains("variants[\"bad name\"].name"), "{e}");
    assert!(
        e.contains("variants[\"bad name\"].refs") && e.contains("never be chosen"),
        "{e}"
    );
    let e = problems(
        "[[pages.first_message.variants]]\nrefs = [\"r\"]\ntemplate = \"x\"\ndefault_text = \"x\"\n",
    );
    assert!(e.contains("first_message.variants[0].name"), "{e}");
}

#[test]
fn variant_quick_replies_follow_meta_limits() {
    let e = problems(
        "[[pages.first_message.variants]]\nname = \"a\"\nrefs = [\"r\"]\ntemplate = \"x\"\n\
         default_text = \"x\"\nquick_replies = [{ title = \"this title is far too long\", \
         payload = \"P\" }]\n",
    );
    assert!(
        e.contains("first_message.variants[\"a\"].quick_replies[0].title"),
        "{e}"
    );
}

#[test]
fn unknown_variant_keys_are_syntax_errors() {
    let e = PagesConfig::parse(
        &pages_file(
            "[[pages.first_message.variants]]\nname = \"a\"\nrefs = [\"r\"]\ntemplate = \"x\"\n\
             default = \"x\"\n",
        ),
        &env,
    )
    .expect_err("typo");
    assert!(matches!(e, PagesError::Syntax { .. }), "{e}");
    assert!(e.to_string().contains("default_text"), "{e}");
}
