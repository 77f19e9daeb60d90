//! The Graph client (`lc_worker::graph`) against the fake Graph API over real HTTP: request
//! shape, token handling, every fault mapped to the right [`FailureClass`], Meta's rules, and
//! the subscription endpoints. Also checks the fake's own rules with raw requests.

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use lc_meta::pages::{FirstMessage, PageConfig, QuickReply};
use lc_meta::secret::Secret;
use lc_testkit::fake_graph::{FAKE_APP_ID, FakeGraph, FakeResponse, TokenSource};
use lc_worker::graph::{FailureClass, GraphClient, GraphFailure, SendOutcome, SubscribedApp};
use serde_json::json;
use sha2::Sha256;
use time::OffsetDateTime;

const PAGE: &str = "1234567890";
const TOKEN: &str = "EAAG-page-token-1234567890";
const WAIT: Duration = Duration::from_secs(5);

fn page_config(id: &str, token: &str, app_secret: Option<&str>) -> PageConfig {
    PageConfig {
        id: id.into(),
        access_token: Secret::new(token),
        app_secret: app_secret.map(Secret::new),
        first_message: FirstMessage {
            text: "Thanks for signing up! What can we help you with?".into(),
            quick_replies: vec![
                QuickReply {
                    title: "Track my order".into(),
                    payload: "TRACK".into(),
                },
                QuickReply {
                    title: "Talk to an agent".into(),
                    payload: "AGENT".into(),
                },
            ],
            variants: vec![],
        },
    }
}

async fn setup(timeout: Duration) -> (FakeGraph, GraphClient, PageConfig) {
    let fake = FakeGraph::start().await;
    fake.add_page(PAGE, TOKEN);
    let client = GraphClient::new(&fake.base_url(), timeout).expect("client");
    (fake, client, page_config(PAGE, TOKEN, None))
}

async fn send(client: &GraphClient, page: &PageConfig, login_id: &str) -> SendOutcome {
    client.send_first_message(page, login_id, None).await
}

fn failure(outcome: SendOutcome) -> GraphFailure {
    match outcome {
        SendOutcome::Failed(f) => f,
        SendOutcome::Sent { .. } => panic!("expected a failure, got {outcome:?}"),
    }
}

fn sent(outcome: SendOutcome) -> (String, Option<String>) {
    match outcome {
        SendOutcome::Sent {
            message_id,
            recipient_id,
            usage: _,
        } => (message_id, recipient_id),
        SendOutcome::Failed(f) => panic!("expected success, got {f}"),
    }
}

fn hmac_hex(key: &str, msg: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(msg.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn success_sends_token_only_in_header_and_the_exact_body() {
    let (fake, client, page) = setup(WAIT).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let outcome = client.send_first_message(&page, "login-1", Some(tp)).await;
    let (message_id, recipient_id) = sent(outcome);
    assert!(message_id.starts_with("m_"), "{message_id}");
    assert!(recipient_id.is_some_and(|r| r.len() == 16));

    let calls = fake.wait_for_send_calls(1, WAIT).await.expect("one call");
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, format!("/v25.0/{PAGE}/messages"));
    assert_eq!(call.query, "", "no query without an app secret");
    assert_eq!(call.page_id, PAGE);
    assert_eq!(
        call.authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(call.token_source, Some(TokenSource::Header));
    assert!(!call.path.contains(TOKEN) && !call.query.contains("access_token"));
    assert_eq!(call.login_id.as_deref(), Some("login-1"));
    assert_eq!(call.outcome, "ok");
    assert_eq!(
        call.body,
        json!({
            "recipient": {"login_id": "login-1"},
            "messaging_type": "UPDATE",
            "message": {
                "text": "Thanks for signing up! What can we help you with?",
                "quick_replies": [
                    {"content_type": "text", "title": "Track my order", "payload": "TRACK"},
                    {"content_type": "text", "title": "Talk to an agent", "payload": "AGENT"},
                ],
            },
        })
    );
}

#[tokio::test]
async fn psid_is_stable_per_page_and_login_id() {
    let (_fake, client, page) = setup(WAIT).await;
    let (_, a) = sent(send(&client, &page, "login-1").await);
    let (_, b) = sent(send(&client, &page, "login-1").await);
    let (_, c) = sent(send(&client, &page, "login-2").await);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[tokio::test]
async fn appsecret_proof_only_with_an_app_secret() {
    let (fake, client, plain) = setup(WAIT).await;
    sent(send(&client, &plain, "login-1").await);

    fake.require_appsecret_proof(PAGE, "app_secret_x");
    let signed = page_config(PAGE, TOKEN, Some("app_secret_x"));
    sent(send(&client, &signed, "login-2").await);
    // The fake now refuses calls without a proof...
    let f = failure(send(&client, &plain, "login-3").await);
    assert_eq!((f.class, f.code), (FailureClass::Permanent, Some(100)));
    // ...and with a proof from the wrong secret.
    let wrong = page_config(PAGE, TOKEN, Some("other_secret"));
    let f = failure(send(&client, &wrong, "login-4").await);
    assert!(f.message.contains("appsecret_proof"), "{f}");

    let calls = fake.send_calls();
    assert_eq!(calls[0].query, "");
    assert_eq!(
        calls[1].query,
        format!("appsecret_proof={}", hmac_hex("app_secret_x", TOKEN))
    );
    assert!(calls.iter().all(|c| !c.query.contains(TOKEN)));
}

#[tokio::test]
async fn scripted_graph_errors_keep_code_subcode_message_and_trace() {
    let (fake, client, page) = setup(WAIT).await;
    fake.script(
        "login-1",
        vec![FakeResponse::Error {
            http_status: 400,
            code: 100,
            subcode: Some(2018001),
            message: "(#100) No matching user found".into(),
        }],
    );
    let f = failure(send(&client, &page, "login-1").await);
    assert_eq!(f.class, FailureClass::Permanent);
    assert_eq!(f.http_status, Some(400));
    assert_eq!((f.code, f.subcode), (Some(100), Some(2018001)));
    assert_eq!(f.message, "(#100) No matching user found");
    assert!(f.fbtrace_id.is_some_and(|t| !t.is_empty()));
    assert_eq!(f.retry_after, None);
    assert_eq!(fake.send_calls()[0].outcome, "error:100/2018001");
    // The script is used up: normal behaviour again.
    sent(send(&client, &page, "login-1").await);
}

#[tokio::test]
async fn code_2_is_transient() {
    let (fake, client, page) = setup(WAIT).await;
    fake.script("login-1", vec![FakeResponse::unexpected()]);
    let f = failure(send(&client, &page, "login-1").await);
    assert_eq!(f.class, FailureClass::Transient);
    assert_eq!((f.http_status, f.code), (Some(500), Some(2)));
}

#[tokio::test]
async fn rate_limits_carry_retry_after_from_the_usage_header() {
    let (fake, client, page) = setup(WAIT).await;
    fake.script(
        "login-1",
        vec![
            FakeResponse::RateLimited {
                code: 613,
                regain_minutes: 5,
            },
            FakeResponse::RateLimited {
                code: 4,
                regain_minutes: 0,
            },
            FakeResponse::RateLimited {
                code: 80006,
                regain_minutes: 1,
            },
        ],
    );
    let f = failure(send(&client, &page, "login-1").await);
    assert_eq!(f.class, FailureClass::RateLimited);
    assert_eq!(f.code, Some(613));
    assert_eq!(f.retry_after, Some(Duration::from_secs(300)));
    let f = failure(send(&client, &page, "login-1").await);
    // Code 4 is the app's limit: every page of the app slows down, not only this one.
    assert_eq!((f.class, f.code), (FailureClass::AppThrottled, Some(4)));
    assert_eq!(f.retry_after, None, "0 minutes means no hint");
    let f = failure(send(&client, &page, "login-1").await);
    assert_eq!((f.class, f.code), (FailureClass::RateLimited, Some(80006)));
    assert_eq!(f.retry_after, Some(Duration::from_secs(60)));
}

#[tokio::test]
async fn bare_5xx_has_an_unknown_outcome_because_graph_may_have_delivered() {
    let (fake, client, page) = setup(WAIT).await;
    fake.script("login-1", vec![FakeResponse::ServerError(502)]);
    let f = failure(send(&client, &page, "login-1").await);
    // A gateway's 502 can come after Graph delivered: a blind retry could message twice.
    assert_eq!(f.class, FailureClass::OutcomeUnknown);
    assert_eq!((f.http_status, f.code), (Some(502), None));
    assert!(f.message.contains("502"), "{f}");
    assert_eq!(fake.send_calls()[0].outcome, "error:http502");
}

#[tokio::test]
async fn a_hang_longer_than_the_timeout_has_an_unknown_outcome_because_it_was_processed() {
    let (fake, client, page) = setup(Duration::from_millis(300)).await;
    fake.script("login-1", vec![FakeResponse::Hang(Duration::from_secs(3))]);
    let started = std::time::Instant::now();
    let f = failure(send(&client, &page, "login-1").await);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "timeout not applied"
    );
    assert_eq!(f.class, FailureClass::OutcomeUnknown);
    assert_eq!(f.http_status, None);
    assert!(f.message.contains("timeout"), "{f}");
    // Graph processed it: the "sent but never heard" case the caller must handle.
    assert_eq!(fake.send_calls()[0].outcome, "ok");
}

#[tokio::test]
async fn latency_beyond_the_timeout_has_an_unknown_outcome() {
    let (fake, client, page) = setup(Duration::from_millis(200)).await;
    fake.set_latency(Duration::from_secs(2));
    let f = failure(send(&client, &page, "login-1").await);
    assert_eq!(f.class, FailureClass::OutcomeUnknown);
    fake.set_latency(Duration::from_millis(10));
    sent(send(&client, &page, "login-2").await);
}

#[tokio::test]
async fn forced_ok_ignores_the_window() {
    let (fake, client, page) = setup(WAIT).await;
    let long_ago = OffsetDateTime::now_utc() - time::Duration::hours(30);
    fake.register_optin("login-1", long_ago);
    fake.script("login-1", vec![FakeResponse::Ok]);
    sent(send(&client, &page, "login-1").await);
    failure(send(&client, &page, "login-1").await);
}

#[tokio::test]
async fn sends_after_the_24h_window_are_permanent_failures() {
    let (fake, client, page) = setup(WAIT).await;
    let now = OffsetDateTime::now_utc();
    fake.register_optin("late", now - time::Duration::hours(24));
    fake.register_optin("fresh", now - time::Duration::hours(23));
    let f = failure(send(&client, &page, "late").await);
    assert_eq!(f.class, FailureClass::Permanent);
    assert_eq!((f.code, f.subcode), (Some(10), Some(2018278)));
    assert!(f.message.contains("outside of allowed window"), "{f}");
    sent(send(&client, &page, "fresh").await);
}

#[tokio::test]
async fn a_login_id_stays_with_the_first_page_that_messaged_it() {
    let (fake, client, page_a) = setup(WAIT).await;
    fake.add_page("555", "token-b");
    let page_b = page_config("555", "token-b", None);
    sent(send(&client, &page_a, "login-1").await);
    let f = failure(send(&client, &page_b, "login-1").await);
    assert_eq!((f.class, f.code), (FailureClass::Permanent, Some(100)));
    assert!(f.message.contains("first messaged through"), "{f}");
    // The first page still can; the other page can message other people.
    sent(send(&client, &page_a, "login-1").await);
    sent(send(&client, &page_b, "login-2").await);
}

#[tokio::test]
async fn a_failed_first_attempt_does_not_bind_the_login_id() {
    let (fake, client, page_a) = setup(WAIT).await;
    fake.add_page("555", "token-b");
    fake.script("login-1", vec![FakeResponse::ServerError(503)]);
    failure(send(&client, &page_a, "login-1").await);
    sent(send(&client, &page_config("555", "token-b", None), "login-1").await);
}

#[tokio::test]
async fn wrong_token_is_token_invalid_and_never_echoed() {
    let (fake, client, _) = setup(WAIT).await;
    let stale = page_config(PAGE, "stale-token-value", None);
    let f = failure(send(&client, &stale, "login-1").await);
    assert_eq!(f.class, FailureClass::TokenInvalid);
    assert_eq!((f.http_status, f.code), (Some(400), Some(190)));
    // A rotated token fixes it.
    fake.set_token(PAGE, "stale-token-value");
    sent(send(&client, &stale, "login-1").await);
    // An unknown page is rejected the same way.
    let unknown = page_config("999", TOKEN, None);
    assert_eq!(
        failure(send(&client, &unknown, "login-2").await).class,
        FailureClass::TokenInvalid
    );
}

#[tokio::test]
async fn a_token_echoed_by_graph_is_scrubbed() {
    let (fake, client, page) = setup(WAIT).await;
    fake.script(
        "login-1",
        vec![FakeResponse::Error {
            http_status: 400,
            code: 190,
            subcode: Some(463),
            message: format!("Error validating access token {TOKEN}: session expired"),
        }],
    );
    let f = failure(send(&client, &page, "login-1").await);
    assert_eq!(f.class, FailureClass::TokenInvalid);
    assert!(!f.message.contains(TOKEN), "{f}");
    assert!(!f.to_string().contains(TOKEN) && !format!("{f:?}").contains(TOKEN));
    assert!(f.message.contains("[redacted]"), "{f}");
}

#[tokio::test]
async fn global_answers_come_before_per_recipient_scripts() {
    let (fake, client, page) = setup(WAIT).await;
    fake.script("login-1", vec![FakeResponse::outside_window()]);
    fake.push_global(vec![FakeResponse::ServerError(503)]);
    assert_eq!(
        failure(send(&client, &page, "login-1").await).class,
        FailureClass::OutcomeUnknown
    );
    assert_eq!(
        failure(send(&client, &page, "login-1").await).code,
        Some(10)
    );
    sent(send(&client, &page, "login-1").await);
    // Global answers hit any recipient.
    fake.push_global(vec![FakeResponse::unexpected()]);
    failure(send(&client, &page, "someone-else").await);
    sent(send(&client, &page, "someone-else").await);
}

#[tokio::test]
async fn failure_rate_is_seeded_and_transient() {
    async fn run(rate: f64) -> Vec<String> {
        let (fake, client, page) = setup(WAIT).await;
        fake.set_failure_rate(rate);
        for i in 0..20 {
            if let SendOutcome::Failed(f) = send(&client, &page, &format!("l{i}")).await {
                assert_eq!(f.class, FailureClass::Transient, "{f}");
            }
        }
        fake.send_calls().into_iter().map(|c| c.outcome).collect()
    }
    let all = run(1.0).await;
    assert!(all.iter().all(|o| o != "ok"), "{all:?}");
    assert!(all.iter().any(|o| o == "error:1200") && all.iter().any(|o| o == "error:2"));
    let a = run(0.5).await;
    assert_eq!(a, run(0.5).await, "same seed, same sequence");
    assert!(
        a.iter().any(|o| o == "ok") && a.iter().any(|o| o != "ok"),
        "{a:?}"
    );
    assert!(run(0.0).await.iter().all(|o| o == "ok"));
}

#[tokio::test]
async fn wait_for_send_calls_wakes_on_arrival_and_times_out() {
    let (fake, client, page) = setup(WAIT).await;
    let waiter = {
        let fake = fake.clone();
        tokio::spawn(async move { fake.wait_for_send_calls(3, WAIT).await })
    };
    for i in 0..3 {
        sent(send(&client, &page, &format!("login-{i}")).await);
    }
    let calls = waiter.await.expect("join").expect("three calls");
    assert_eq!(calls.len(), 3);
    let err = fake
        .wait_for_send_calls(4, Duration::from_millis(100))
        .await
        .expect_err("only three");
    assert!(err.contains("got 3"), "{err}");
}

#[tokio::test]
async fn subscribed_apps_read_and_subscribe() {
    let (fake, client, page) = setup(WAIT).await;
    assert_eq!(client.subscribed_apps(&page).await.expect("empty"), vec![]);
    fake.set_subscription(PAGE, "777", &["messages"]);
    let apps = client.subscribed_apps(&page).await.expect("list");
    assert_eq!(apps.len(), 1);
    assert_eq!(
        (apps[0].id.as_str(), apps[0].subscribed_fields.as_slice()),
        ("777", ["messages".to_owned()].as_slice())
    );

    let fields = ["messages", "messaging_optins", "messaging_postbacks"];
    client
        .subscribe_app(&page, &fields)
        .await
        .expect("subscribe");
    let mine = fake
        .subscriptions(PAGE)
        .into_iter()
        .find(|s| s.app_id == FAKE_APP_ID)
        .expect("subscribed");
    assert_eq!(mine.subscribed_fields, fields);
    let apps = client.subscribed_apps(&page).await.expect("list");
    assert!(apps.contains(&SubscribedApp {
        id: FAKE_APP_ID.into(),
        name: Some(format!("Fake app {FAKE_APP_ID}")),
        subscribed_fields: fields.iter().map(|f| (*f).to_owned()).collect(),
    }));

    let calls = fake.calls();
    let post = calls.iter().find(|c| c.method == "POST").expect("post");
    assert_eq!(post.path, format!("/v25.0/{PAGE}/subscribed_apps"));
    assert_eq!(
        post.query,
        "subscribed_fields=messages%2Cmessaging_optins%2Cmessaging_postbacks"
    );
    assert!(
        calls
            .iter()
            .all(|c| c.token_source == Some(TokenSource::Header))
    );
    assert!(fake.send_calls().is_empty());

    let stale = page_config(PAGE, "stale", None);
    let f = client.subscribed_apps(&stale).await.expect_err("bad token");
    assert_eq!(f.class, FailureClass::TokenInvalid);
    let f = client
        .subscribe_app(&stale, &fields)
        .await
        .expect_err("bad token");
    assert_eq!(f.class, FailureClass::TokenInvalid);
}

#[tokio::test]
async fn check_token_accepts_the_page_token_only() {
    let (fake, client, page) = setup(WAIT).await;
    client.check_token(&page).await.expect("valid");
    let call = fake.calls().pop().expect("call");
    assert_eq!(
        (call.path.as_str(), call.query.as_str()),
        ("/v25.0/me", "fields=id")
    );

    let f = client
        .check_token(&page_config(PAGE, "nope", None))
        .await
        .expect_err("invalid");
    assert_eq!((f.class, f.code), (FailureClass::TokenInvalid, Some(190)));
    // A valid token of another page, configured for this one.
    fake.add_page("555", "token-b");
    let mixed_up = page_config(PAGE, "token-b", None);
    let f = client.check_token(&mixed_up).await.expect_err("other page");
    assert_eq!(f.class, FailureClass::TokenInvalid);
    assert!(f.message.contains("555"), "{f}");
}

/// The fake itself, with raw requests the client never makes.
#[tokio::test]
async fn fake_accepts_query_tokens_and_me_and_rejects_bad_bodies() {
    let fake = FakeGraph::start().await;
    fake.add_page(PAGE, TOKEN);
    let http = reqwest::Client::new();
    let base = fake.base_url();
    let body = json!({"recipient": {"login_id": "l1"}, "messaging_type": "UPDATE",
                      "message": {"text": "hi"}});

    let r = http
        .post(format!("{base}/me/messages?access_token={TOKEN}"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let call = fake.send_calls().pop().expect("call");
    assert_eq!(call.token_source, Some(TokenSource::Query));
    assert_eq!(call.page_id, PAGE, "me resolves to the token's page");

    let cases = [
        (json!({}), "recipient is required"),
        (
            json!({"recipient": {"user": "x"}, "messaging_type": "UPDATE", "message": {"text": "hi"}}),
            "recipient[id] must be a valid ID string",
        ),
        (
            json!({"recipient": {"login_id": "l"}, "message": {"text": "hi"}}),
            "messaging_type",
        ),
        (
            json!({"recipient": {"login_id": "l"}, "messaging_type": "UPDATE"}),
            "Must send either message or state",
        ),
        (
            json!({"recipient": {"login_id": "l"}, "messaging_type": "UPDATE",
                   "message": {"text": "x".repeat(2000)}}),
            "less than 2000",
        ),
    ];
    for (bad, expected) in cases {
        let r = http
            .post(format!("{base}/{PAGE}/messages"))
            .bearer_auth(TOKEN)
            .json(&bad)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400);
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["error"]["code"], 100, "{v}");
        assert_eq!(v["error"]["type"], "OAuthException");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(expected), "{msg} should contain {expected}");
    }

    let r = http
        .post(format!("{base}/{PAGE}/messages"))
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    let v: serde_json::Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], 190, "missing token: {v}");
    assert_eq!(fake.send_calls().last().map(|c| c.token_source), Some(None));
}

#[tokio::test]
async fn a_refused_connection_is_transient_because_nothing_was_sent() {
    // Nothing listens on this port (bound, then dropped).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let (_fake, _client, page) = setup(Duration::from_millis(500)).await;
    let client = lc_worker::graph::GraphClient::new(
        &format!("http://127.0.0.1:{port}/v25.0"),
        Duration::from_millis(500),
    )
    .expect("client");
    let f = failure(send(&client, &page, "login-1").await);
    assert_eq!(f.class, FailureClass::Transient, "{f}");
    assert!(f.message.contains("cannot connect"), "{f}");
}
