//! Personalised first messages on the real services: the opt-in webhook's `ref`/`payload`
//! chooses a page's variant, the business's login event brings the variables, and what
//! reaches the fake Graph is the rendered text — or the variant's default text when a
//! variable is missing or the rendering would break Meta's limits, never the broken one.

use lc_meta::pages::MAX_TEXT_CHARS;
use lc_shared::topology;
use lc_testkit::login::{APP_ID, login_args, login_id_for, post_login_event, sign_now};
use lc_testkit::pipeline::{
    FIRST_TEXT, PAGE, PAGE_TOKEN, Pipeline, TestEnv, WAIT, body, eventually, metrics_text, ms,
    optin_item, post_signed,
};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// The test page with three variants besides its own message.
fn pages_file() -> String {
    format!(
        r#"[[pages]]
id = "{PAGE}"
access_token = "{PAGE_TOKEN}"
[pages.first_message]
text = "{FIRST_TEXT}"
quick_replies = [{{ title = "Track my order", payload = "TRACK" }}]

[[pages.first_message.variants]]
name = "order"
refs = ["checkout", "42"]
template = "Hi {{{{ first_name }}}}, thanks for buying {{{{ product }}}}!"
default_text = "Thanks for your order!"

[[pages.first_message.variants]]
name = "welcome"
refs = ["welcome-ref", "welcome-payload"]
template = "Welcome aboard!"
default_text = "Welcome!"
quick_replies = []

[[pages.first_message.variants]]
name = "shout"
refs = ["shout"]
template = "{{{{ product }}}} {{{{ product }}}} {{{{ product }}}} {{{{ product }}}} {{{{ product }}}}"
default_text = "Thanks!"
"#
    )
}

/// Ingest with login events and a scheduler that waits `send_delay_secs` after an opt-in
/// (so a login event and its webhook can both arrive before the send), on the variant pages.
async fn setup(send_delay_secs: u64) -> (TestEnv, Pipeline) {
    let env = TestEnv::new().await;
    std::fs::write(&env.pages_file, pages_file()).expect("write pages file");
    let mut config = env.scheduler_config();
    config.send_delay_secs = send_delay_secs;
    let pipeline = env
        .pipeline()
        .login(login_args(None))
        .scheduler(config)
        .start()
        .await;
    (env, pipeline)
}

/// An opt-in item whose `optin` object also has `extra` members (`ref`, `payload`, …).
fn optin_with(login_id: &str, at: OffsetDateTime, extra: Value) -> Value {
    let mut item = optin_item(PAGE, login_id, at);
    if let (Some(optin), Value::Object(extra)) = (item["optin"].as_object_mut(), extra) {
        optin.extend(extra);
    }
    item
}

/// Posts a signed login event for `asid` carrying `variables`; returns the status and answer.
async fn login_event(p: &Pipeline, asid: &str, variables: Value) -> (u16, Value) {
    let body = serde_json::to_vec(&json!({"asid": asid, "app_id": APP_ID, "page_id": PAGE,
        "logged_in_at": ms(OffsetDateTime::now_utc()), "variables": variables}))
    .expect("json");
    post_login_event(&p.ingest, &body, Some(&sign_now(&body))).await
}

/// The message body Graph received for `login_id` (waits for `total` send calls first).
async fn sent_message(env: &TestEnv, total: usize, login_id: &str) -> Value {
    let calls = env
        .graph
        .wait_for_send_calls(total, WAIT)
        .await
        .expect("send calls");
    let call = calls
        .iter()
        .find(|c| c.login_id.as_deref() == Some(login_id))
        .unwrap_or_else(|| panic!("no send to {login_id}: {calls:?}"));
    call.body["message"].clone()
}

async fn fallbacks(p: &Pipeline, reason: &str) -> bool {
    metrics_text(p.scheduler().metrics_addr)
        .await
        .contains(&format!(
            "scheduler_message_fallbacks_total{{reason=\"{reason}\"}} 1"
        ))
}

#[tokio::test]
async fn ref_and_login_event_variables_render_in_either_order() {
    let (env, p) = setup(3).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();

    // A: the login event first (variables), then the webhook with `optin.ref`.
    let a = login_id_for("7000001", PAGE);
    let (status, answer) = login_event(
        &p,
        "7000001",
        json!({"first_name": "Ada", "product": "a blue kettle"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let delivery = body(PAGE, vec![optin_with(&a, now, json!({"ref": "checkout"}))]);
    assert_eq!(post_signed(&p.ingest, delivery).await, 200);

    // B: the webhook first with `optin.payload` (numeric), then the login event.
    let b = login_id_for("7000002", PAGE);
    let delivery = body(PAGE, vec![optin_with(&b, now, json!({"payload": 42}))]);
    assert_eq!(post_signed(&p.ingest, delivery).await, 200);
    let (status, answer) = login_event(
        &p,
        "7000002",
        json!({"first_name": "Bo", "product": "two mugs"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");

    // Before the send, both halves are on each row.
    for (login_id, message_ref) in [(&a, "checkout"), (&b, "42")] {
        eventually(WAIT, "ref and variables merged on the row", || async {
            let row = sql
                .query_one(
                    "SELECT message_ref, variables IS NOT NULL, state FROM optins \
                     WHERE page_id = $1 AND login_id = $2",
                    &[&PAGE, login_id],
                )
                .await;
            row.is_ok_and(|r| {
                r.get::<_, String>(2) != "pending"
                    || (r.get::<_, Option<String>>(0).as_deref() == Some(message_ref)
                        && r.get::<_, bool>(1))
            })
        })
        .await;
    }

    let ma = sent_message(&env, 2, &a).await;
    assert_eq!(
        ma,
        json!({"text": "Hi Ada, thanks for buying a blue kettle!", "quick_replies": [
            {"content_type": "text", "title": "Track my order", "payload": "TRACK"}]})
    );
    let mb = sent_message(&env, 2, &b).await;
    assert_eq!(mb["text"], "Hi Bo, thanks for buying two mugs!");
    assert_eq!(env.graph.send_calls().len(), 2, "one message per opt-in");

    // Personal data: the variables are gone once the message is sent; the ref stays.
    eventually(WAIT, "variables erased after the send", || async {
        sql.query_one(
            "SELECT count(*) FROM optins WHERE state = 'sent' AND variables IS NULL \
             AND message_ref IS NOT NULL",
            &[],
        )
        .await
        .is_ok_and(|r| r.get::<_, i64>(0) == 2)
    })
    .await;
}

#[tokio::test]
async fn missing_variable_sends_the_variant_default_text() {
    let (env, p) = setup(3).await;
    let login_id = login_id_for("7000003", PAGE);
    let (status, _) = login_event(&p, "7000003", json!({"first_name": "Ada"})).await;
    assert_eq!(status, 200);
    let delivery = body(
        PAGE,
        vec![optin_with(
            &login_id,
            OffsetDateTime::now_utc(),
            json!({"ref": "checkout"}),
        )],
    );
    assert_eq!(post_signed(&p.ingest, delivery).await, 200);
    let message = sent_message(&env, 1, &login_id).await;
    assert_eq!(message["text"], "Thanks for your order!");
    eventually(WAIT, "the fallback counted", || {
        fallbacks(&p, "missing_variable")
    })
    .await;
}

#[tokio::test]
async fn over_long_rendering_is_never_sent() {
    let (env, p) = setup(3).await;
    let login_id = login_id_for("7000004", PAGE);
    // Five times 400 characters is 2004 with the spaces: over Meta's 1999.
    let product = "x".repeat(400);
    let (status, answer) = login_event(&p, "7000004", json!({ "product": product })).await;
    assert_eq!(status, 200, "{answer}");
    let delivery = body(
        PAGE,
        vec![optin_with(
            &login_id,
            OffsetDateTime::now_utc(),
            json!({"ref": "shout"}),
        )],
    );
    assert_eq!(post_signed(&p.ingest, delivery).await, 200);
    let message = sent_message(&env, 1, &login_id).await;
    assert_eq!(message["text"], "Thanks!");
    eventually(WAIT, "the fallback counted", || fallbacks(&p, "too_long")).await;
    // Graph never received the long rendering (nor anything over the limit): the opt-in is
    // finished (sent), so no later call can come for it.
    assert_eq!(env.graph.send_calls().len(), 1);
    for call in env.graph.send_calls() {
        let text = call.body["message"]["text"].as_str().unwrap_or_default();
        assert!(text.chars().count() <= MAX_TEXT_CHARS, "{}", text.len());
        assert!(!text.contains(&product), "the long rendering was sent");
    }
}

#[tokio::test]
async fn every_webhook_shape_chooses_its_message() {
    let (env, p) = setup(0).await;
    let now = OffsetDateTime::now_utc();
    let cases = [
        ("7000010", json!({"ref": "welcome-ref"}), "Welcome aboard!"),
        (
            "7000011",
            json!({"payload": "welcome-payload"}),
            "Welcome aboard!",
        ),
        ("7000012", json!({"ref": 42}), "Thanks for your order!"),
        ("7000013", json!({}), FIRST_TEXT),
        ("7000014", json!({"ref": null}), FIRST_TEXT),
        ("7000015", json!({"ref": "no-such-variant"}), FIRST_TEXT),
        // Variables are taken only from login events, never from a webhook.
        (
            "7000016",
            json!({"ref": "checkout", "variables": {"first_name": "Eve", "product": "x"}}),
            "Thanks for your order!",
        ),
    ];
    let items: Vec<Value> = cases
        .iter()
        .map(|(asid, extra, _)| optin_with(&login_id_for(asid, PAGE), now, extra.clone()))
        .collect();
    assert_eq!(post_signed(&p.ingest, body(PAGE, items)).await, 200);
    for (asid, _, text) in &cases {
        let message = sent_message(&env, cases.len(), &login_id_for(asid, PAGE)).await;
        assert_eq!(message["text"], *text, "opt-in {asid}");
        // The welcome variant has no quick replies; the others have the page's.
        let has_replies = message.get("quick_replies").is_some();
        assert_eq!(has_replies, *text != "Welcome aboard!", "opt-in {asid}");
    }
    assert_eq!(env.graph.send_calls().len(), cases.len());
}

#[tokio::test]
async fn bad_variables_are_refused_with_what_was_wrong() {
    let env = TestEnv::new().await;
    // Ingest alone: whatever it published would stay on the opt-in queue.
    let p = env.pipeline().login(login_args(None)).start().await;
    let cases = [
        (json!("Ada"), "must be a JSON object"),
        (json!({"first_name": 7}), "`first_name` must be a string"),
        (json!({"first name": "Ada"}), "\"first name\" is invalid"),
        (json!({"note": "x".repeat(501)}), "at most 500"),
        (json!({"note": "a\u{1}b"}), "control character"),
    ];
    for (variables, expected) in cases {
        let (status, answer) = login_event(&p, "7000020", variables.clone()).await;
        assert_eq!(status, 400, "{variables}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{variables}: {error}");
    }
    assert_eq!(
        env.depth(topology::SCHEDULER_QUEUE).await,
        0,
        "nothing published"
    );
}

#[tokio::test]
async fn variables_are_erased_whichever_way_an_opt_in_ends() {
    let env = TestEnv::new().await;
    let _pool = env.migrated_pool(1).await;
    let sql = env.sql().await;
    sql.batch_execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
             next_attempt_at, message_ref, variables) \
         SELECT '1', 'l' || s, now(), now() + interval '1 day', now(), 'pending', now(), 'r', \
             '{\"first_name\": \"Ada\"}' FROM generate_series(1, 6) s",
    )
    .await
    .expect("rows");
    // Claimed and given back: still needed, kept.
    sql.batch_execute(
        "UPDATE optins SET state = 'sending' WHERE login_id = 'l1'; \
         UPDATE optins SET state = 'pending' WHERE login_id = 'l1'; \
         UPDATE optins SET state = 'sent' WHERE login_id = 'l2'; \
         UPDATE optins SET state = 'replied' WHERE login_id = 'l3'; \
         UPDATE optins SET state = 'failed' WHERE login_id = 'l4'; \
         UPDATE optins SET state = 'expired' WHERE login_id = 'l5'",
    )
    .await
    .expect("transitions");
    let kept: Vec<String> = sql
        .query(
            "SELECT login_id FROM optins WHERE variables IS NOT NULL ORDER BY login_id",
            &[],
        )
        .await
        .expect("query")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        kept,
        ["l1", "l6"],
        "only unfinished opt-ins keep their variables"
    );
    // A row inserted already finished (an expired or unknown-page opt-in) stores none.
    sql.batch_execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
             next_attempt_at, variables) \
         VALUES ('1', 'l7', now(), now(), now(), 'expired', now(), '{\"a\": \"b\"}')",
    )
    .await
    .expect("insert");
    let erased: bool = sql
        .query_one(
            "SELECT variables IS NULL FROM optins WHERE login_id = 'l7'",
            &[],
        )
        .await
        .expect("row")
        .get(0);
    assert!(erased);
}
