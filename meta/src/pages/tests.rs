//! Tests of the `PAGES_FILE` rules: one test per rule, each asserting that the error names
//! the page and the field and never shows a secret.

use super::*;

const TOKEN: &str = "EAAG-secret-token-value";

fn env(name: &str) -> Option<String> {
    match name {
        "PAGE_TOKEN" => Some(TOKEN.to_owned()),
        "APP_SECRET" => Some("app-secret-value".to_owned()),
        "EMPTY" => Some("  ".to_owned()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<PagesConfig, PagesError> {
    PagesConfig::parse(text, &env)
}

/// A valid page with `extra` lines inserted in `[[pages]]` and `msg` as the first message.
fn page(id: &str, extra: &str, msg: &str) -> String {
    format!("[[pages]]\nid = \"{id}\"\n{extra}\n[pages.first_message]\n{msg}\n")
}

const TOKEN_ENV: &str = "access_token_env = \"PAGE_TOKEN\"";
const TEXT: &str = "text = \"Hello!\"";

/// Parses, expects an error, checks it names `page` and `field` and hides secrets.
fn err(text: &str, page_label: &str, field: &str) -> String {
    let e = match parse(text) {
        Ok(cfg) => panic!("expected an error, got {cfg:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(page_label),
        "error does not name {page_label}: {e}"
    );
    assert!(e.contains(field), "error does not name field {field}: {e}");
    assert!(
        e.contains(PARSE_ORIGIN),
        "error does not name the file: {e}"
    );
    assert!(!e.contains(TOKEN), "error shows the token: {e}");
    assert!(
        !e.contains("app-secret-value"),
        "error shows the app secret: {e}"
    );
    e
}

#[test]
fn design_example_parses() {
    let text = r#"
[[pages]]
id = "1234567890"
access_token_env = "PAGE_TOKEN"
app_secret_env = "APP_SECRET"
[pages.first_message]
text = "Thanks for signing up! What can we help you with?"
quick_replies = [
  { title = "Track my order", payload = "TRACK" },
  { title = "Talk to an agent", payload = "AGENT" },
]

[[pages]]
id = "42"
access_token = "inline-token"
[pages.first_message]
text = "Hi"
"#;
    let cfg = parse(text).expect("valid");
    assert_eq!(cfg.pages.len(), 2);
    let p = cfg.get("1234567890").expect("page");
    assert_eq!(p.access_token.expose(), TOKEN);
    assert_eq!(
        p.app_secret.as_ref().map(Secret::expose),
        Some("app-secret-value")
    );
    assert_eq!(p.first_message.quick_replies[1].payload, "AGENT");
    let q = cfg.get("42").expect("page 42");
    assert_eq!(q.access_token.expose(), "inline-token");
    assert!(q.app_secret.is_none());
    assert!(cfg.get("7").is_none());
    // Debug never shows tokens.
    assert!(!format!("{cfg:?}").contains(TOKEN));
}

#[test]
fn first_message_serializes_to_send_api_shape() {
    let m = FirstMessage {
        text: "Hi".into(),
        quick_replies: vec![QuickReply {
            title: "Yes".into(),
            payload: "Y".into(),
        }],
        ..FirstMessage::default()
    };
    assert_eq!(
        serde_json::to_value(&m).expect("json"),
        serde_json::json!({"text": "Hi", "quick_replies": [
            {"content_type": "text", "title": "Yes", "payload": "Y"}]})
    );
    let bare = FirstMessage {
        text: "Hi".into(),
        quick_replies: vec![],
        variants: vec![],
    };
    assert_eq!(
        serde_json::to_value(&bare).expect("json"),
        serde_json::json!({"text": "Hi"})
    );
}

#[test]
fn tokens_are_trimmed() {
    let cfg = parse(&page("1", "access_token = \" tok \\n\"", TEXT)).expect("valid");
    assert_eq!(cfg.pages[0].access_token.expose(), "tok");
}

#[test]
fn id_missing_is_named_by_index() {
    let text = format!(
        "{}[[pages]]\n{TOKEN_ENV}\n[pages.first_message]\n{TEXT}\n",
        page("1", TOKEN_ENV, TEXT)
    );
    err(&text, "page #2", "`id`");
}

#[test]
fn id_empty_is_rejected() {
    err(&page("", TOKEN_ENV, TEXT), "page #1", "`id`");
}

#[test]
fn id_must_be_digits() {
    let e = err(
        &page("my-page", TOKEN_ENV, TEXT),
        "page \"my-page\"",
        "`id`",
    );
    assert!(e.contains("digits"), "{e}");
}

#[test]
fn id_with_a_dot_or_too_long_for_a_routing_key_is_rejected() {
    let e = err(&page("12.34", TOKEN_ENV, TEXT), "page \"12.34\"", "`id`");
    assert!(e.contains("digits"), "{e}");
    let long = "9".repeat(crate::ids::MAX_PAGE_ID_BYTES + 1);
    let e = err(&page(&long, TOKEN_ENV, TEXT), "`id`", "`id`");
    assert!(e.contains("bytes long"), "{e}");
}

#[test]
fn duplicate_ids_are_rejected() {
    let text = format!(
        "{}{}",
        page("123", TOKEN_ENV, TEXT),
        page("123", TOKEN_ENV, TEXT)
    );
    let e = err(&text, "page \"123\"", "`id`");
    assert!(e.contains("duplicate") && e.contains("page #1"), "{e}");
}

#[test]
fn token_missing_is_rejected() {
    err(&page("123", "", TEXT), "page \"123\"", "`access_token`");
}

#[test]
fn token_both_forms_is_rejected() {
    let extra = format!("access_token = \"{TOKEN}\"\n{TOKEN_ENV}");
    let e = err(
        &page("123", &extra, TEXT),
        "page \"123\"",
        "access_token_env",
    );
    assert!(e.contains("keep only one"), "{e}");
}

#[test]
fn token_inline_empty_is_rejected() {
    err(
        &page("123", "access_token = \"\"", TEXT),
        "page \"123\"",
        "`access_token`",
    );
}

#[test]
fn token_env_unset_names_the_variable() {
    let e = err(
        &page("123", "access_token_env = \"NOPE_TOKEN\"", TEXT),
        "page \"123\"",
        "`access_token_env`",
    );
    assert!(e.contains("NOPE_TOKEN"), "{e}");
}

#[test]
fn token_env_empty_names_the_variable() {
    let e = err(
        &page("123", "access_token_env = \"EMPTY\"", TEXT),
        "page \"123\"",
        "`access_token_env`",
    );
    assert!(e.contains("EMPTY"), "{e}");
}

#[test]
fn app_secret_env_unset_names_the_variable() {
    let extra = format!("{TOKEN_ENV}\napp_secret_env = \"NO_SECRET\"");
    let e = err(
        &page("123", &extra, TEXT),
        "page \"123\"",
        "`app_secret_env`",
    );
    assert!(e.contains("NO_SECRET"), "{e}");
}

#[test]
fn app_secret_both_forms_is_rejected() {
    let extra =
        format!("{TOKEN_ENV}\napp_secret = \"app-secret-value\"\napp_secret_env = \"APP_SECRET\"");
    err(&page("123", &extra, TEXT), "page \"123\"", "`app_secret`");
}

#[test]
fn first_message_missing_is_rejected() {
    let text = format!("[[pages]]\nid = \"123\"\n{TOKEN_ENV}\n");
    err(&text, "page \"123\"", "`first_message`");
}

#[test]
fn text_missing_or_blank_is_rejected() {
    err(
        &page("123", TOKEN_ENV, "quick_replies = []"),
        "page \"123\"",
        "`first_message.text`",
    );
    err(
        &page("123", TOKEN_ENV, "text = \"   \""),
        "page \"123\"",
        "`first_message.text`",
    );
}

#[test]
fn text_limit_counts_characters_not_bytes() {
    // 1999 two-byte characters (3998 bytes) is within the limit...
    let ok = format!("text = \"{}\"", "é".repeat(MAX_TEXT_CHARS));
    assert!(parse(&page("123", TOKEN_ENV, &ok)).is_ok());
    // ...2000 is not ("less than 2000 characters").
    let long = format!("text = \"{}\"", "é".repeat(MAX_TEXT_CHARS + 1));
    let e = err(
        &page("123", TOKEN_ENV, &long),
        "page \"123\"",
        "`first_message.text`",
    );
    assert!(e.contains("2000"), "{e}");
}

fn quick_replies(n: usize, title: &str, payload: &str) -> String {
    let items: Vec<String> = (0..n)
        .map(|_| format!("{{ title = \"{title}\", payload = \"{payload}\" }}"))
        .collect();
    format!("{TEXT}\nquick_replies = [{}]", items.join(", "))
}

#[test]
fn at_most_13_quick_replies() {
    assert!(parse(&page("123", TOKEN_ENV, &quick_replies(13, "t", "p"))).is_ok());
    err(
        &page("123", TOKEN_ENV, &quick_replies(14, "t", "p")),
        "page \"123\"",
        "`first_message.quick_replies`",
    );
}

#[test]
fn quick_reply_title_is_1_to_20_characters() {
    let max = "ü".repeat(MAX_TITLE_CHARS);
    assert!(parse(&page("123", TOKEN_ENV, &quick_replies(1, &max, "p"))).is_ok());
    let long = "ü".repeat(MAX_TITLE_CHARS + 1);
    err(
        &page("123", TOKEN_ENV, &quick_replies(1, &long, "p")),
        "page \"123\"",
        "`first_message.quick_replies[0].title`",
    );
    err(
        &page("123", TOKEN_ENV, &quick_replies(1, "", "p")),
        "page \"123\"",
        "`first_message.quick_replies[0].title`",
    );
}

#[test]
fn quick_reply_payload_is_1_to_1000_characters() {
    let max = "p".repeat(MAX_PAYLOAD_CHARS);
    assert!(parse(&page("123", TOKEN_ENV, &quick_replies(1, "t", &max))).is_ok());
    let long = "p".repeat(MAX_PAYLOAD_CHARS + 1);
    err(
        &page("123", TOKEN_ENV, &quick_replies(1, "t", &long)),
        "page \"123\"",
        "`first_message.quick_replies[0].payload`",
    );
    let missing = format!("{TEXT}\nquick_replies = [{{ title = \"t\" }}]");
    err(
        &page("123", TOKEN_ENV, &missing),
        "page \"123\"",
        "`first_message.quick_replies[0].payload`",
    );
}

#[test]
fn unknown_keys_are_rejected_with_location() {
    // A typo in a page table (and the token value on the same table is not shown).
    let text = page("123", &format!("acess_token = \"{TOKEN}\""), TEXT);
    let e = err(&text, "page #1", "acess_token");
    assert!(e.contains("line 3"), "{e}");
    // A typo in the first message.
    err(&page("123", TOKEN_ENV, "txt = \"hi\""), "page #1", "txt");
    // A typo at the top level.
    let e = parse("[[page]]\nid = \"1\"\n")
        .expect_err("typo")
        .to_string();
    assert!(e.contains("page"), "{e}");
}

#[test]
fn syntax_errors_never_show_values() {
    // A token where a table is expected: serde would quote the value.
    let text = format!("[[pages]]\nid = \"1\"\nfirst_message = \"{TOKEN}\"\n");
    let e = parse(&text).expect_err("bad type").to_string();
    assert!(!e.contains(TOKEN), "{e}");
    assert!(e.contains("line 3"), "{e}");
    // An unterminated string holding a token.
    let text = format!("[[pages]]\nid = \"1\"\naccess_token = \"{TOKEN}\n");
    let e = parse(&text).expect_err("syntax").to_string();
    assert!(!e.contains(TOKEN), "{e}");
}

#[test]
fn empty_file_is_rejected() {
    let e = parse("").expect_err("empty").to_string();
    assert!(e.contains("no [[pages]]"), "{e}");
}

#[test]
fn all_problems_are_listed() {
    let text = format!(
        "{}{}",
        page("abc", "", TEXT),
        page("456", TOKEN_ENV, "text = \"\"")
    );
    let e = parse(&text).expect_err("invalid");
    let PagesError::Invalid { problems, .. } = &e else {
        panic!("unexpected {e:?}");
    };
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["id", "access_token", "first_message.text"]);
    assert_eq!(problems[2].page, "page \"456\"");
}

#[test]
fn load_reads_a_file_and_names_it() {
    let dir = std::env::temp_dir().join(format!("lc-pages-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let path = dir.join("pages.toml");
    std::fs::write(&path, page("77", "access_token = \"x\"", TEXT)).expect("write");
    let cfg = PagesConfig::load(&path).expect("load");
    assert_eq!(cfg.pages[0].id, "77");
    std::fs::write(&path, page("77", "", TEXT)).expect("write");
    let e = PagesConfig::load(&path).expect_err("invalid").to_string();
    assert!(e.contains(&path.display().to_string()), "{e}");
    let missing = dir.join("missing.toml");
    let e = PagesConfig::load(&missing)
        .expect_err("missing")
        .to_string();
    assert!(e.contains("missing.toml"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_first_message_round_trips_through_json_and_validates() {
    let m = FirstMessage {
        text: "Hi".into(),
        quick_replies: vec![QuickReply {
            title: "Yes".into(),
            payload: "Y".into(),
        }],
        variants: vec![],
    };
    let json = serde_json::to_value(&m).expect("json");
    assert_eq!(json["quick_replies"][0]["content_type"], "text");
    let back: FirstMessage = serde_json::from_value(json).expect("back");
    assert_eq!(back, m);
    assert!(back.validate("page \"1\"").is_ok());
    let bad = FirstMessage {
        text: " ".into(),
        quick_replies: vec![],
        variants: vec![],
    };
    let problems = bad.validate("page \"1\"").expect_err("empty text");
    assert_eq!(problems[0].field, "first_message.text");
}
