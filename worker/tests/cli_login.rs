//! `loginconnect login-url`, run as the built binary: the URL it prints, the JS snippet, the
//! reset warning, and its refusals.

#![allow(
    clippy::expect_used,
    reason = "a test binary: a panic is a failed test"
)]

use std::process::{Command, Output};

use reqwest::Url;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loginconnect"))
        .arg("login-url")
        .args(args)
        .output()
        .expect("run the loginconnect binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn param(url: &Url, name: &str) -> Vec<String> {
    url.query_pairs()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

const BASE: [&str; 6] = [
    "--app-id",
    "111111111111111",
    "--redirect-uri",
    "https://shop.example/fb/callback?next=/cart&x=a b",
    "--page-id",
    "222222222222222",
];

#[test]
fn prints_the_dialog_url_and_the_js_equivalent() {
    let mut args = BASE.to_vec();
    args.extend([
        "--scope",
        "email,public_profile",
        "--scope",
        "user_messenger_contact",
    ]);
    let out = run(&args);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let first = text.lines().next().expect("a first line");
    let url = Url::parse(first).expect("the first line is the URL");
    assert_eq!(url.scheme(), "https");
    assert_eq!(url.host_str(), Some("www.facebook.com"));
    assert_eq!(url.path(), "/v25.0/dialog/oauth");
    assert_eq!(param(&url, "client_id"), ["111111111111111"]);
    assert_eq!(
        param(&url, "redirect_uri"),
        ["https://shop.example/fb/callback?next=/cart&x=a%20b"]
    );
    assert_eq!(
        param(&url, "scope"),
        ["email,public_profile,user_messenger_contact"]
    );
    assert_eq!(param(&url, "messenger_page_id"), ["222222222222222"]);
    assert_eq!(param(&url, "auth_type"), ["rerequest"]);
    assert!(param(&url, "reset_messenger_state").is_empty());
    let state = param(&url, "state");
    assert_eq!(state.len(), 1);
    assert_eq!(state[0].len(), 32, "a random 128-bit state");
    assert!(text.contains(&format!("state: {}", state[0])));
    // The redirect URI's own query is encoded inside ours, not merged into it.
    assert!(param(&url, "next").is_empty() && param(&url, "x").is_empty());
    assert!(
        text.contains(
            "FB.login(function (response) { /* response.authResponse.userID is the asid */ }, \
             {scope: 'email,public_profile,user_messenger_contact', messenger_page_id: \
             '222222222222222', auth_type: 'rerequest'});"
        ),
        "{text}"
    );
    assert!(
        !stderr(&out).contains("warning"),
        "no warning without reset"
    );

    let again = stdout(&run(&args));
    assert_ne!(
        again.lines().next(),
        Some(first),
        "a new state on every run"
    );
}

#[test]
fn reset_adds_the_parameter_and_warns_on_stderr() {
    let mut args = BASE.to_vec();
    args.extend([
        "--reset-messenger-state",
        "--state",
        "fixed-state",
        "--json",
    ]);
    let out = run(&args);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("only for people with a role in the app"),
        "{}",
        stderr(&out)
    );
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON output");
    let url = Url::parse(json["url"].as_str().expect("url")).expect("URL");
    assert_eq!(param(&url, "reset_messenger_state"), ["1"]);
    assert_eq!(param(&url, "state"), ["fixed-state"]);
    assert_eq!(json["state"], "fixed-state");
    assert_eq!(json["scope"], "user_messenger_contact");
    assert!(
        json["js_snippet"]
            .as_str()
            .is_some_and(|s| s.contains("reset_messenger_state: 1"))
    );
}

#[test]
fn refuses_bad_input_with_a_message() {
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "--app-id",
                "abc",
                "--redirect-uri",
                "https://a.example/",
                "--page-id",
                "1",
            ],
            "app id must be digits",
        ),
        (
            &[
                "--app-id",
                "1",
                "--redirect-uri",
                "not a url",
                "--page-id",
                "1",
            ],
            "redirect URI",
        ),
        (
            &[
                "--app-id",
                "1",
                "--redirect-uri",
                "https://a.example/",
                "--page-id",
                "1",
                "--scope",
                "email'",
            ],
            "invalid permission",
        ),
    ];
    for (args, message) in cases {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "no URL printed for {args:?}");
    }
}
