//! The web console (issue 17) in a real browser: headless Chromium driven through
//! chromedriver (`lc_testkit::browser`) against the admin listener started in-process.
//!
//! Log-in with a read token shows no write action (and a forged one is refused), a wrong
//! token gets the form again with 401, a paused page shows its reason, a write token pauses
//! and resumes, read-only mode hides and refuses every write; at-risk, failures and a
//! timeline show rows the real pipeline made; a failed opt-in is retried (the fake Graph
//! receives the call) and dead letters are replayed. With `UPDATE_SCREENSHOTS=1`
//! the tests write the README's pictures (docs/console/*.png).

use std::time::Duration;

use lc_shared::{amqp, topology};
use lc_testkit::admin::{Admin, READ_TOKEN, WRITE_TOKEN};
use lc_testkit::browser::Browser;
use lc_testkit::fake_graph::FakeResponse;
use lc_testkit::harness::queue_depth;
use lc_testkit::pipeline::{
    PAGE, Pipeline, TestEnv, WAIT, body, eventually, optin_item, optin_state, post_signed,
};
use lc_worker::admin::console::ConsoleSettings;
use serde_json::json;
use time::OffsetDateTime;

const CLIENT_PAGE: &str = "5234567890";

/// Creates a named page through the admin API.
async fn create_page(admin: &Admin, page_id: &str, name: &str) {
    let created = admin
        .write(
            "POST",
            "/pages",
            Some(json!({"page_id": page_id, "name": name,
                        "first_message": {"text": "Hello"}})),
        )
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
}

/// Logs in through the form with `token` and waits for the pages view.
async fn log_in(browser: &Browser, admin: &Admin, token: &str) {
    browser.goto(&format!("{}/console/pages", admin.base)).await;
    // Without a session the console sends the browser to the log-in form.
    browser.wait_css("form input#token").await;
    browser.fill("#token", token).await;
    browser.click("#login-submit").await;
    browser.wait_css("#who-name").await;
}

#[tokio::test]
async fn a_read_token_sees_paused_pages_but_no_write_action_and_cannot_forge_one() {
    let env = TestEnv::new().await;
    let admin = env.start_admin().await;
    create_page(&admin, CLIENT_PAGE, "Client A").await;
    let paused = admin
        .write("POST", &format!("/pages/{CLIENT_PAGE}/pause"), None)
        .await;
    assert_eq!(paused.status, 200, "{:?}", paused.body);

    let browser = Browser::start().await;
    log_in(&browser, &admin, READ_TOKEN).await;
    browser.wait_text("#who-scope", "read").await;
    let row = format!("#page-{CLIENT_PAGE}");
    let state = browser.wait_text(&format!("{row} .state"), "paused").await;
    assert!(state.contains("operator"), "the reason is written: {state}");
    let details = browser.wait_text(&row, "paused by ops").await;
    assert!(details.contains("Client A"), "{details}");
    // No write control of any kind for a read token.
    assert!(!browser.has("form[action$='/pause']").await);
    assert!(!browser.has("form[action$='/resume']").await);
    assert!(!browser.has("a[href$='/token']").await);
    assert!(!browser.has("button.write").await);
    let html = browser.source().await;
    assert!(!html.contains(READ_TOKEN), "the token is never rendered");

    // The session cookie is HttpOnly: the page's scripts cannot read it.
    let cookie = browser.execute("return document.cookie", vec![]).await;
    assert_eq!(cookie, json!(""), "HttpOnly cookie visible to scripts");

    // A forged write (the form a read user never sees) is refused, and nothing changed.
    browser
        .execute(
            "const f = document.createElement('form'); f.method = 'post'; \
             f.action = arguments[0]; document.body.appendChild(f); f.submit();",
            vec![json!(format!("/console/pages/{CLIENT_PAGE}/resume"))],
        )
        .await;
    browser.wait_text("#error-message", "scope `read`").await;
    let status = admin.read(&format!("/pages/{CLIENT_PAGE}/status")).await;
    assert_eq!(status.body["state"], "paused", "{:?}", status.body);

    // Bearer authentication works for reading too (e.g. curl), and a wrong one is 401.
    let http = reqwest::Client::new();
    let page = http
        .get(format!("{}/console/pages", admin.base))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .expect("answer");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("body").contains(CLIENT_PAGE));
    let wrong = http
        .get(format!("{}/console/pages", admin.base))
        .bearer_auth("not-a-configured-token-at-all")
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), 401);

    browser.close().await;
    admin.stop().await;
}

#[tokio::test]
async fn a_wrong_token_gets_the_form_again_with_401_and_is_not_echoed() {
    let env = TestEnv::new().await;
    let admin = env.start_admin().await;
    let browser = Browser::start().await;
    let wrong = "wrong-token-that-nobody-configured-0123";
    browser.goto(&format!("{}/console/login", admin.base)).await;
    browser.fill("#token", wrong).await;
    browser.click("#login-submit").await;
    browser
        .wait_text("#login-error", "not one of ADMIN_TOKENS")
        .await;
    assert!(browser.has("input#token[aria-invalid='true']").await);
    assert!(!browser.source().await.contains(wrong), "never echoed");
    assert!(!browser.has("#who-name").await, "not logged in");
    // The status is 401 (the browser does not tell; ask over HTTP with the same form).
    let answer = reqwest::Client::new()
        .post(format!("{}/console/login", admin.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={wrong}"))
        .send()
        .await
        .expect("answer");
    assert_eq!(answer.status(), 401);
    assert!(answer.headers().get("set-cookie").is_none());
    browser.close().await;
    admin.stop().await;
}

#[tokio::test]
async fn a_write_token_pauses_and_resumes_a_page_and_replaces_its_token() {
    let env = TestEnv::new().await;
    let admin = env.start_admin().await;
    create_page(&admin, CLIENT_PAGE, "Client A").await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, WRITE_TOKEN).await;
    let row = format!("#page-{CLIENT_PAGE}");

    browser
        .click(&format!("{row} form[action$='/pause'] button"))
        .await;
    browser.wait_text("#notice", "is paused").await;
    browser
        .wait_text(&format!("{row} .state"), "paused: operator")
        .await;
    browser.screenshot("pages").await;
    let status = admin.read(&format!("/pages/{CLIENT_PAGE}/status")).await;
    assert_eq!(status.body["state"], "paused");

    browser
        .click(&format!("{row} form[action$='/resume'] button"))
        .await;
    browser.wait_text("#notice", "is resumed").await;
    let status = admin.read(&format!("/pages/{CLIENT_PAGE}/status")).await;
    assert_ne!(status.body["state"], "paused", "{:?}", status.body);

    let page_token = "EAAG-page-token-typed-into-the-console-0123456789";
    browser.click(&format!("{row} a[href$='/token']")).await;
    browser.fill("#access_token", page_token).await;
    browser.click("form[action$='/token'] button").await;
    browser.wait_text("#notice", "token of page").await;
    browser
        .wait_text(&format!("{row} td:nth-of-type(4)"), "stored")
        .await;
    assert!(!browser.source().await.contains(page_token));
    browser.close().await;
    admin.stop().await;
}

#[tokio::test]
async fn read_only_mode_hides_and_refuses_every_write_even_for_a_write_token() {
    let env = TestEnv::new().await;
    let admin = env
        .start_admin_console(ConsoleSettings {
            read_only: true,
            https: false,
        })
        .await;
    create_page(&admin, CLIENT_PAGE, "Client A").await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, WRITE_TOKEN).await;
    browser.wait_text("#read-only", "read-only").await;
    browser.wait_css(&format!("#page-{CLIENT_PAGE}")).await;
    assert!(!browser.has("button.write").await);
    assert!(!browser.has("a[href$='/token']").await);
    // Submitting the pause form anyway (with a valid CSRF token: the logout form's) fails.
    browser
        .execute(
            "const csrf = document.querySelector('input[name=csrf]').value; \
             const f = document.createElement('form'); f.method = 'post'; \
             f.action = arguments[0]; const i = document.createElement('input'); \
             i.name = 'csrf'; i.value = csrf; f.appendChild(i); \
             document.body.appendChild(f); f.submit();",
            vec![json!(format!("/console/pages/{CLIENT_PAGE}/pause"))],
        )
        .await;
    browser.wait_text("#error-message", "read-only").await;
    let status = admin.read(&format!("/pages/{CLIENT_PAGE}/status")).await;
    assert_ne!(status.body["state"], "paused", "{:?}", status.body);
    browser.close().await;
    admin.stop().await;
}

/// Opt-ins made by the real pipeline: `P551` fails for good (Graph 551/1545041), `SENT1` is
/// sent, then with the page paused `WAIT1` stays pending. Returns the pipeline and the admin.
async fn failed_sent_and_waiting(env: &TestEnv) -> (Pipeline, Admin) {
    let events = env.capture_events(&["first_message.*.#"]).await;
    let p = env.start_pipeline(env.scheduler_config()).await;
    let admin = env.start_admin().await;
    env.graph.script(
        "P551",
        vec![FakeResponse::Error {
            http_status: 400,
            code: 551,
            subcode: Some(1545041),
            message: "This person isn't available right now.".into(),
        }],
    );
    let now = OffsetDateTime::now_utc();
    let items = vec![
        optin_item(PAGE, "P551", now),
        optin_item(PAGE, "SENT1", now),
    ];
    assert_eq!(post_signed(&p.ingest, body(PAGE, items)).await, 200);
    let got = env.events(&events, 2).await;
    assert_eq!(got.len(), 2, "a failed and a sent event: {got:?}");

    let paused = admin
        .write("POST", &format!("/pages/{PAGE}/pause"), None)
        .await;
    assert_eq!(paused.status, 200, "{:?}", paused.body);
    let items = vec![optin_item(PAGE, "WAIT1", OffsetDateTime::now_utc())];
    assert_eq!(post_signed(&p.ingest, body(PAGE, items)).await, 200);
    let sql = env.sql().await;
    eventually(WAIT, "WAIT1 recorded as pending", || async {
        optin_state(&sql, "WAIT1").await.as_deref() == Some("pending")
    })
    .await;
    (p, admin)
}

#[tokio::test]
async fn at_risk_failures_and_a_timeline_with_its_trace_id_and_events() {
    let env = TestEnv::new().await;
    let (mut p, admin) = failed_sent_and_waiting(&env).await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, READ_TOKEN).await;

    browser
        .goto(&format!("{}/console/at-risk", admin.base))
        .await;
    let row = browser.wait_text("#at-risk tbody tr", "WAIT1").await;
    assert!(row.contains("paused: operator"), "{row}");
    assert!(row.contains("pending"), "{row}");
    assert!(
        !browser.source().await.contains("P551"),
        "a failed opt-in is not at risk"
    );
    browser.screenshot("at-risk").await;

    browser
        .goto(&format!("{}/console/failures", admin.base))
        .await;
    let row = browser.wait_text("#failures tbody tr", "P551").await;
    assert!(row.contains("graph_permanent"), "{row}");
    assert!(row.contains("code 551/1545041"), "{row}");
    assert!(row.contains("isn't available right now"), "{row}");
    assert!(
        !browser.has("form[action$='/retry']").await,
        "read scope: no retry"
    );
    browser.screenshot("failures").await;

    // The failure's login id leads to its timeline; SENT1's has every step and its event.
    browser
        .goto(&format!(
            "{}/console/optin?page_id={PAGE}&login_id=SENT1",
            admin.base
        ))
        .await;
    let steps = browser.wait_text("#steps", "answered").await;
    for step in ["received", "claimed", "called", "answered"] {
        assert!(steps.contains(step), "{step} in {steps}");
    }
    let events = browser.wait_text("#events", "first_message.sent").await;
    assert!(events.contains("first_message.sent"), "{events}");
    browser.wait_text("#events", "published").await;
    let sql = env.sql().await;
    let traceparent: String = sql
        .query_one(
            "SELECT traceparent FROM optins WHERE login_id = 'SENT1'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    let trace_id = traceparent.split('-').nth(1).expect("a trace id");
    browser.wait_text("#trace-id", trace_id).await;
    browser.screenshot("timeline").await;

    // An unknown opt-in is said so, with 404 for a client that asks.
    browser
        .goto(&format!(
            "{}/console/optin?page_id={PAGE}&login_id=NOBODY",
            admin.base
        ))
        .await;
    browser
        .wait_text("#missing", "No opt-in of that login_id")
        .await;

    browser.close().await;
    admin.stop().await;
    p.stop().await;
}

#[tokio::test]
async fn a_write_token_retries_a_failed_optin_and_the_fake_graph_receives_the_call() {
    let env = TestEnv::new().await;
    let (mut p, admin) = failed_sent_and_waiting(&env).await;
    let resumed = admin
        .write("POST", &format!("/pages/{PAGE}/resume"), None)
        .await;
    assert_eq!(resumed.status, 200, "{:?}", resumed.body);
    let calls_before = |login: &str| {
        env.graph
            .send_calls()
            .iter()
            .filter(|c| c.login_id.as_deref() == Some(login))
            .count()
    };
    assert_eq!(calls_before("P551"), 1, "one failed call so far");

    let browser = Browser::start().await;
    log_in(&browser, &admin, WRITE_TOKEN).await;
    browser
        .goto(&format!("{}/console/failures", admin.base))
        .await;
    browser.wait_text("#failures tbody tr", "P551").await;
    browser.screenshot("failures").await;
    browser
        .click("#failures form[action='/console/optin/retry'] button")
        .await;
    // Back on the opt-in's timeline with the notice; the scheduler sends it again.
    browser.wait_text("#notice", "pending again").await;
    eventually(WAIT, "the fake Graph receives the retried call", || async {
        calls_before("P551") == 2
    })
    .await;
    let sql = env.sql().await;
    eventually(WAIT, "P551 sent", || async {
        optin_state(&sql, "P551").await.as_deref() == Some("sent")
    })
    .await;
    browser
        .goto(&format!(
            "{}/console/optin?page_id={PAGE}&login_id=P551",
            admin.base
        ))
        .await;
    browser.wait_text("#optin-state", "sent").await;
    assert!(
        !browser.has("#retry").await,
        "a sent opt-in offers no retry"
    );

    // The same retry again is refused with the reason (the form is stale now).
    browser
        .goto(&format!("{}/console/failures", admin.base))
        .await;
    browser.wait_css("h1").await;
    browser
        .execute(
            "const csrf = document.querySelector('input[name=csrf]').value; \
             const f = document.createElement('form'); f.method = 'post'; \
             f.action = '/console/optin/retry'; \
             for (const [k, v] of [['csrf', csrf], ['page_id', arguments[0]], \
                                   ['login_id', 'P551']]) { \
               const i = document.createElement('input'); i.name = k; i.value = v; \
               f.appendChild(i); } \
             document.body.appendChild(f); f.submit();",
            vec![json!(PAGE)],
        )
        .await;
    browser.wait_text("#error-message", "not failed").await;
    assert_eq!(
        calls_before("P551"),
        2,
        "never sent twice by a refused retry"
    );

    browser.close().await;
    admin.stop().await;
    p.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_one_by_id_then_the_whole_queue() {
    let env = TestEnv::new().await;
    let conn = env.vhost.connect().await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    topology::declare(&ch).await.expect("topology");
    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    for id in ["d-1", "d-2", "d-3"] {
        let props = amqp::persistent_properties(id, "application/json").with_headers(
            amqp::string_headers(&[
                (topology::ERROR_HEADER, "poison for the console test"),
                (topology::ORIGIN_QUEUE_HEADER, topology::SCHEDULER_QUEUE),
            ]),
        );
        let body = format!(r#"{{"login_id": "{id}"}}"#);
        let confirm = amqp::publish(&ch, "", &dlq, true, body.as_bytes(), props)
            .await
            .expect("publish");
        amqp::await_confirm(confirm, Duration::from_secs(5))
            .await
            .expect("confirm");
    }
    let admin = env.start_admin().await;
    let browser = Browser::start().await;
    log_in(&browser, &admin, WRITE_TOKEN).await;
    browser
        .goto(&format!("{}/console/dead-letters", admin.base))
        .await;
    let table = format!("#dlq-{}", dlq.replace('.', "-"));
    let listed = browser.wait_text(&table, "d-3").await;
    assert!(listed.contains("poison for the console test"), "{listed}");
    browser
        .wait_text("body", "scheduler.optins.dlq: 3 messages")
        .await;
    browser.screenshot("dead-letters").await;

    // Replay d-2 by its id: it goes back to the scheduler's queue, the others stay.
    browser
        .click(&format!("{table} form:has(input[value='d-2']) button"))
        .await;
    browser.wait_text("#notice", "message d-2").await;
    let back = env.take_all(topology::SCHEDULER_QUEUE).await;
    assert_eq!(back.len(), 1, "exactly the one replayed");
    assert_eq!(back[0].data.as_slice(), br#"{"login_id": "d-2"}"#);
    let rows = browser.wait_text(&table, "d-1").await;
    assert!(rows.contains("d-3") && !rows.contains("d-2"), "{rows}");

    // Then the rest of the queue.
    browser
        .click(&format!(
            "form:has(input[value='{dlq}']):not(:has(input[name=message_id])) button"
        ))
        .await;
    browser.wait_text("#notice", "2 message(s)").await;
    let depth_ch = conn.create_channel().await.expect("channel");
    eventually(WAIT, "the dead-letter queue empty", || async {
        queue_depth(&depth_ch, &dlq).await == 0
    })
    .await;
    assert_eq!(env.take_all(topology::SCHEDULER_QUEUE).await.len(), 2);

    browser.close().await;
    admin.stop().await;
}
