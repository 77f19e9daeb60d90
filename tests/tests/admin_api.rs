//! The admin API (issue 16): scopes (no token 401, a read token cannot write 403), input
//! errors that say what to fix, tokens never echoed, and a token replaced through the API
//! resuming a paused page on every scheduler replica.

use std::time::Duration;

use lc_testkit::admin::{KEYS, READ_TOKEN, WRITE_TOKEN};
use lc_testkit::pipeline::{PAGE, TestEnv, WAIT, eventually, insert_optin};
use serde_json::json;
use time::OffsetDateTime;

const APP: &str = "987654321";
const CLIENT_PAGE: &str = "5234567890";

#[tokio::test]
async fn no_token_is_401_a_read_token_cannot_write_403_and_errors_say_what_to_fix() {
    let env = TestEnv::new().await;
    let admin = env.start_admin().await;
    let page = json!({
        "page_id": CLIENT_PAGE, "app_id": APP, "name": "Client A",
        "first_message": {"text": "Hello from client A"}, "rate_limit": 20
    });

    let none = admin.call("GET", "/pages", None, None).await;
    assert_eq!(none.status, 401);
    assert!(
        none.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer")
    );
    let wrong = admin
        .call("GET", "/pages", Some("not-a-configured-token-at-all"), None)
        .await;
    assert_eq!(wrong.status, 401);
    let refused = admin
        .call("POST", "/pages", Some(READ_TOKEN), Some(page.clone()))
        .await;
    assert_eq!(refused.status, 403, "{:?}", refused.body);
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("crm") && message.contains("`write`"),
        "{message}"
    );
    assert!(
        !refused.text.contains(READ_TOKEN),
        "a token is never echoed"
    );
    assert_eq!(
        admin.read(&format!("/pages/{CLIENT_PAGE}")).await.status,
        404
    );

    // A page of an unknown app, then the app, then the page.
    let orphan = admin.write("POST", "/pages", Some(page.clone())).await;
    assert_eq!(orphan.status, 400);
    assert!(
        orphan.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("POST /apps")
    );
    let secret_given = admin
        .write(
            "POST",
            "/apps",
            Some(json!({"app_id": APP, "app_secret_env": "not a name!"})),
        )
        .await;
    assert_eq!(secret_given.status, 400, "an app secret itself is refused");
    let app = admin
        .write(
            "POST",
            "/apps",
            Some(json!({"app_id": APP, "app_secret_env": "CLIENT_A_APP_SECRET"})),
        )
        .await;
    assert_eq!(app.status, 201, "{:?}", app.body);
    let created = admin.write("POST", "/pages", Some(page.clone())).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["source"], "api");
    assert_eq!(admin.write("POST", "/pages", Some(page)).await.status, 409);

    // Meta's limits are checked before anything is stored.
    let long = admin
        .write(
            "PATCH",
            &format!("/pages/{CLIENT_PAGE}"),
            Some(json!({"first_message": {"text": "x".repeat(2000)}})),
        )
        .await;
    assert_eq!(long.status, 400);
    assert!(
        long.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("first_message.text")
    );
    let not_json = admin
        .write(
            "PATCH",
            &format!("/pages/{CLIENT_PAGE}"),
            Some(json!({"colour": 1})),
        )
        .await;
    assert_eq!(not_json.status, 400);
    assert!(
        not_json.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour")
    );

    // The token: stored, never returned; a read token cannot replace it.
    let token = json!({"access_token": "EAAG-client-a-secret-token"});
    let path = format!("/pages/{CLIENT_PAGE}/token");
    assert_eq!(
        admin
            .call("PUT", &path, Some(READ_TOKEN), Some(token.clone()))
            .await
            .status,
        403
    );
    let stored = admin.write("PUT", &path, Some(token)).await;
    assert_eq!(stored.status, 200, "{:?}", stored.body);
    assert_eq!(stored.body["key_id"], "k1");
    for answer in [
        &stored,
        &admin.read(&format!("/pages/{CLIENT_PAGE}")).await,
        &admin.read(&format!("/pages/{CLIENT_PAGE}/status")).await,
        &admin.read("/pages").await,
    ] {
        assert!(!answer.text.contains("client-a-secret"), "{}", answer.text);
    }
    let status = admin.read(&format!("/pages/{CLIENT_PAGE}/status")).await;
    assert_eq!(status.body["token"], "stored");

    // Operator pause and resume, seen in the status.
    let paused = admin
        .write("POST", &format!("/pages/{CLIENT_PAGE}/pause"), None)
        .await;
    assert_eq!(paused.body["state"], "paused");
    assert_eq!(paused.body["paused"]["reason"], "operator");
    let resumed = admin
        .write("POST", &format!("/pages/{CLIENT_PAGE}/resume"), None)
        .await;
    assert_eq!(resumed.body["state"], "active");
    // Announced once each, as events of the page's own app.
    let sql = env.sql().await;
    let events = sql
        .query(
            "SELECT event_type, cloudevent->>'appid', cloudevent->'data'->>'reason' FROM outbox \
             WHERE page_id = $1 ORDER BY id",
            &[&CLIENT_PAGE],
        )
        .await
        .expect("outbox");
    let seen: Vec<(String, Option<String>, Option<String>)> = events
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let of_app = |kind: &str| {
        (
            kind.to_owned(),
            Some(APP.to_owned()),
            Some("operator".to_owned()),
        )
    };
    assert_eq!(seen, vec![of_app("page.paused"), of_app("page.resumed")]);

    assert_eq!(
        admin
            .write("DELETE", &format!("/pages/{CLIENT_PAGE}"), None)
            .await
            .status,
        204
    );
    assert_eq!(
        admin.read(&format!("/pages/{CLIENT_PAGE}")).await.status,
        404
    );
    assert_eq!(
        admin
            .call("GET", "/nowhere", Some(WRITE_TOKEN), None)
            .await
            .status,
        404
    );
    admin.stop().await;
}

#[tokio::test]
async fn a_token_replaced_through_the_api_resumes_a_paused_page_on_every_replica() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    // Graph knows only the new token: every call with the file's gets code 190.
    let new_token = "EAAG-replaced-through-the-api";
    env.graph.set_token(PAGE, new_token);
    let mut config = env.scheduler_config();
    config.page_token_keys = KEYS.into();
    let sql = env.sql().await;
    for i in 0..20 {
        insert_optin(
            &sql,
            PAGE,
            &format!("T{i}"),
            OffsetDateTime::now_utc(),
            "pending",
        )
        .await;
    }
    let a = env.start_scheduler(config.clone()).await;
    let b = env.start_scheduler(config).await;
    let admin = env.start_admin().await;
    eventually(WAIT, "the page paused for its token", || async {
        admin.read(&format!("/pages/{PAGE}/status")).await.body["paused"]["reason"]
            == "token_invalid"
    })
    .await;
    let before = env.graph.send_calls().len();

    let stored = admin
        .write(
            "PUT",
            &format!("/pages/{PAGE}/token"),
            Some(json!({"access_token": new_token})),
        )
        .await;
    assert_eq!(stored.status, 200, "{:?}", stored.body);
    assert_eq!(
        admin.read(&format!("/pages/{PAGE}/status")).await.body["state"],
        "active"
    );
    eventually(
        Duration::from_secs(30),
        "every opt-in sent with the new token",
        || async {
            let sent: i64 = sql
                .query_one("SELECT count(*) FROM optins WHERE state = 'sent'", &[])
                .await
                .expect("count")
                .get(0);
            sent == 20
        },
    )
    .await;
    for (s, stop) in [a, b] {
        stop.trigger();
        s.task.await.expect("stopped");
    }
    admin.stop().await;
    let calls = env.graph.send_calls();
    let ok: Vec<_> = calls[before..]
        .iter()
        .filter(|c| c.outcome == "ok")
        .collect();
    assert_eq!(ok.len(), 20, "one message per opt-in after the new token");
    assert!(
        ok.iter()
            .all(|c| c.authorization.as_deref() == Some(&format!("Bearer {new_token}"))),
        "sent with the token stored through the API"
    );
}
