//! User data deletion against real RabbitMQ and PostgreSQL: Meta's `signed_request` is
//! verified, the person's opt-ins and links are deleted by the scheduler, `identity.deleted`
//! events announce it, and the status URL goes from `pending` to `completed`. Bad requests
//! are refused and queue nothing; a redelivered request changes nothing.

use lc_ingest::RunningIngest;
use lc_meta::login::deletion::{DELETION_QUEUE, DeletionIdentity, DeletionRequest};
use lc_meta::login::signed_request::sign_request;
use lc_testkit::contract::load_schema;
use lc_testkit::login::{OTHER_PAGE, STATUS_BASE, login_id_for};
use lc_testkit::pipeline::{APP_SECRET, PAGE, TestEnv, WAIT, event_json, eventually, metrics_text};
use lc_worker::deletion::{Applied, Deleted, apply};
use serde_json::{Value, json};
use time::OffsetDateTime;
const ASID: &str = "7770001";
const OTHER_ASID: &str = "7770002";

fn signed_request_for(asid: &str, secret: &str) -> String {
    sign_request(
        secret,
        &json!({"algorithm": "HMAC-SHA256", "expires": 0,
                "issued_at": OffsetDateTime::now_utc().unix_timestamp(), "user_id": asid}),
    )
}

async fn post_form(ingest: &RunningIngest, form: &[(&str, &str)]) -> (u16, Value) {
    lc_testkit::login::post_form(ingest, "/data-deletion", form).await
}

async fn status(ingest: &RunningIngest, code: &str) -> (u16, Value) {
    let resp = reqwest::get(format!("http://{}/data-deletion/{code}", ingest.addr))
        .await
        .expect("get");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// A sent opt-in, a link and a link conflict for `login_id` on `page`.
async fn seed(sql: &tokio_postgres::Client, page: &str, login_id: &str, psid: &str) {
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
             next_attempt_at, message_id, sent_at, finished_at) \
         VALUES ($1, $2, now(), now() + interval '1 day', now(), 'sent', now(), 'm_1', now(), now())",
        &[&page, &login_id],
    )
    .await
    .expect("opt-in");
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, $2, $3, now())",
        &[&page, &login_id, &psid],
    )
    .await
    .expect("link");
    sql.execute(
        "INSERT INTO link_conflicts (page_id, login_id, linked_psid, conflicting_psid) \
         VALUES ($1, $2, $3, 'other-psid')",
        &[&page, &login_id, &psid],
    )
    .await
    .expect("conflict");
}

async fn rows(sql: &tokio_postgres::Client, login_id: &str) -> i64 {
    sql.query_one(
        "SELECT (SELECT count(*) FROM optins WHERE login_id = $1) \
              + (SELECT count(*) FROM links WHERE login_id = $1) \
              + (SELECT count(*) FROM link_conflicts WHERE login_id = $1)",
        &[&login_id],
    )
    .await
    .expect("count")
    .get(0)
}

fn validator(file: &str) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&load_schema(file))
        .expect("schema")
}

#[tokio::test]
async fn a_deletion_request_deletes_announces_and_reports_completion() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["identity.deleted.#"]).await;
    let (scheduler, _stop) = env.start_scheduler(env.scheduler_config()).await;
    let (ingest, _stop_ingest) = env.start_login_ingest().await;
    let sql = env.sql().await;
    let login_id = login_id_for(ASID, PAGE);
    let other_person = login_id_for(OTHER_ASID, PAGE);
    seed(&sql, PAGE, &login_id, "PSID-1").await;
    seed(&sql, PAGE, &other_person, "PSID-2").await;

    let (code_status, answer) = post_form(
        &ingest,
        &[("signed_request", &signed_request_for(ASID, APP_SECRET))],
    )
    .await;
    assert_eq!(code_status, 200, "{answer}");
    let code = answer["confirmation_code"]
        .as_str()
        .expect("code")
        .to_owned();
    assert_eq!(
        answer["url"],
        format!("{}data-deletion/{code}", STATUS_BASE).as_str()
    );

    let got = env.deliveries(&events, 2, WAIT).await;
    assert_eq!(got.len(), 2, "one identity.deleted per configured page");
    let (envelope, data_schema) = (
        validator("cloudevent.json"),
        validator("identity.deleted.json"),
    );
    let mut by_page = std::collections::BTreeMap::new();
    for d in &got {
        let ev = event_json(d);
        assert_eq!(
            d.routing_key.as_str(),
            format!(
                "identity.deleted.{}",
                ev["data"]["page_id"].as_str().expect("page")
            )
        );
        let problems: Vec<String> = envelope
            .iter_errors(&ev)
            .chain(data_schema.iter_errors(&ev["data"]))
            .map(|e| e.to_string())
            .collect();
        assert!(problems.is_empty(), "{ev}: {problems:?}");
        assert_eq!(ev["type"], "com.loginconnect.identity.deleted");
        assert_eq!(ev["data"]["confirmation_code"], code.as_str());
        by_page.insert(
            ev["data"]["page_id"].as_str().expect("page").to_owned(),
            ev["data"].clone(),
        );
    }
    assert_eq!(by_page[PAGE]["login_id"], login_id.as_str());
    assert_eq!(by_page[PAGE]["psid"], "PSID-1");
    assert_eq!(
        by_page[OTHER_PAGE]["login_id"],
        login_id_for(ASID, OTHER_PAGE).as_str()
    );
    assert_eq!(by_page[OTHER_PAGE]["psid"], Value::Null);

    eventually(WAIT, "status completed", || async {
        status(&ingest, &code).await.1["status"] == "completed"
    })
    .await;
    let (s, report) = status(&ingest, &code).await;
    assert_eq!(s, 200);
    assert_eq!(report["deleted"], 3, "{report}");
    assert_eq!(report["deleted_optins"], 1);
    assert_eq!(report["deleted_links"], 1);
    assert_eq!(report["deleted_link_conflicts"], 1);
    assert_eq!(report["deleted_outbox_events"], 0);
    assert_eq!(report["identities"], 2);
    assert_eq!(
        report["matched_identities"], 1,
        "only the first page held anything"
    );
    assert_eq!(rows(&sql, &login_id).await, 0, "the person's rows are gone");
    assert_eq!(
        rows(&sql, &other_person).await,
        3,
        "another person's rows are kept"
    );

    let metrics = metrics_text(scheduler.metrics_addr).await;
    assert!(metrics.contains("scheduler_data_deletions_total{result=\"completed\"} 1"));
}

#[tokio::test]
async fn status_is_pending_until_the_scheduler_ran() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    let (ingest, _stop_ingest) = env.start_login_ingest().await;

    let (s, answer) = post_form(
        &ingest,
        &[("signed_request", &signed_request_for(ASID, APP_SECRET))],
    )
    .await;
    assert_eq!(s, 200, "{answer}");
    let code = answer["confirmation_code"]
        .as_str()
        .expect("code")
        .to_owned();
    assert_eq!(
        env.depth(DELETION_QUEUE).await,
        1,
        "stored before the answer"
    );
    let (s, report) = status(&ingest, &code).await;
    assert_eq!(
        (s, report["status"].as_str()),
        (200, Some("pending")),
        "{report}"
    );

    let (_scheduler, _stop) = env.start_scheduler(env.scheduler_config()).await;
    eventually(WAIT, "status completed", || async {
        status(&ingest, &code).await.1["status"] == "completed"
    })
    .await;
    let (_, report) = status(&ingest, &code).await;
    assert_eq!(report["deleted"], 0, "nothing was stored for this person");
    assert_eq!(report["matched_identities"], 0, "{report}");
    assert_eq!(env.depth(DELETION_QUEUE).await, 0);
}

#[tokio::test]
async fn bad_requests_are_refused_and_queue_nothing() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    let (ingest, _stop_ingest) = env.start_login_ingest().await;

    let good = signed_request_for(ASID, APP_SECRET);
    let (sig, payload) = good.split_once('.').expect("dot");
    let wrong_algorithm = sign_request(
        APP_SECRET,
        &json!({"algorithm": "HMAC-SHA1", "user_id": ASID}),
    );
    struct Case {
        what: &'static str,
        field: &'static str,
        value: String,
        status: u16,
        message: &'static str,
    }
    let case = |what, field, value: String, status, message| Case {
        what,
        field,
        value,
        status,
        message,
    };
    let other_payload = signed_request_for(OTHER_ASID, APP_SECRET);
    let (_, other_payload) = other_payload.split_once('.').expect("dot");
    let cases = vec![
        case(
            "wrong secret",
            "signed_request",
            signed_request_for(ASID, "another-app-secret"),
            401,
            "signature does not match",
        ),
        case(
            "payload swapped",
            "signed_request",
            format!("{sig}.{other_payload}"),
            401,
            "signature does not match",
        ),
        case(
            "no dot",
            "signed_request",
            format!("{sig}{payload}"),
            400,
            "malformed",
        ),
        case(
            "not base64",
            "signed_request",
            "!!!.???".into(),
            400,
            "malformed",
        ),
        case(
            "wrong algorithm",
            "signed_request",
            wrong_algorithm,
            400,
            "HMAC-SHA256",
        ),
        case("no field", "other", "x".into(), 400, "signed_request"),
    ];
    for c in cases {
        let (got, json) = post_form(&ingest, &[(c.field, c.value.as_str())]).await;
        assert_eq!(got, c.status, "{}: {json}", c.what);
        let error = json["error"].as_str().unwrap_or_default();
        assert!(error.contains(c.message), "{}: {error}", c.what);
    }
    let json_body = reqwest::Client::new()
        .post(format!("http://{}/data-deletion", ingest.addr))
        .json(&json!({"signed_request": good}))
        .send()
        .await
        .expect("post");
    assert_eq!(
        json_body.status().as_u16(),
        400,
        "only Meta's form encoding"
    );
    assert_eq!(env.depth(DELETION_QUEUE).await, 0);

    // Codes are authenticated: made-up or altered codes are unknown, not "pending".
    let (_, answer) = post_form(&ingest, &[("signed_request", &good)]).await;
    let code = answer["confirmation_code"]
        .as_str()
        .expect("code")
        .to_owned();
    let mut altered = code.clone().into_bytes();
    altered[47] = if altered[47] == b'0' { b'1' } else { b'0' };
    let altered = String::from_utf8(altered).expect("ascii");
    for unknown in [&"0".repeat(48), &altered, &"x".to_owned()] {
        assert_eq!(status(&ingest, unknown).await.0, 404, "{unknown}");
    }
    assert_eq!(status(&ingest, &code).await.1["status"], "pending");
}

#[tokio::test]
async fn a_redelivered_request_changes_nothing() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let sql = env.sql().await;
    let login_id = login_id_for(ASID, PAGE);
    seed(&sql, PAGE, &login_id, "PSID-1").await;
    let request = DeletionRequest {
        confirmation_code: "a".repeat(48),
        requested_at: OffsetDateTime::now_utc(),
        identities: vec![DeletionIdentity {
            page_id: PAGE.to_owned(),
            login_id: login_id.clone(),
        }],
    };
    let mut client = pool.get().await.expect("client");
    let first = apply(&mut client, &request).await.expect("apply");
    assert_eq!(
        first,
        Applied::Completed(Deleted {
            matched: 1,
            optins: 1,
            links: 1,
            link_conflicts: 1,
            events: 1,
            ..Deleted::default()
        })
    );
    drop(client);
    // The person opts in again afterwards (a new login): a redelivery of the old request
    // must not delete the new data, nor announce twice.
    seed(&sql, PAGE, &login_id, "PSID-1").await;
    let (a, b) = tokio::join!(
        async {
            let mut c = pool.get().await.expect("client");
            apply(&mut c, &request).await.expect("apply")
        },
        async {
            let mut c = pool.get().await.expect("client");
            apply(&mut c, &request).await.expect("apply")
        },
    );
    assert_eq!((a, b), (Applied::AlreadyDone, Applied::AlreadyDone));
    assert_eq!(rows(&sql, &login_id).await, 3);
    let events: i64 = sql
        .query_one(
            "SELECT count(*) FROM outbox WHERE event_type = 'identity.deleted'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(events, 1);
}

/// Issue 14, item 5: only a fresh deletion callback is accepted. Facebook Login's own
/// `signed_request` (it carries `code` or `oauth_token`; every visitor who logs in holds
/// one) is refused, as is one issued too long ago, in the future, or without `issued_at`;
/// nothing is queued for any of them.
#[tokio::test]
async fn login_signed_requests_and_stale_callbacks_are_refused() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    let (ingest, _stop_ingest) = env.start_login_ingest().await;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let payload = |extra: Value| {
        let mut p = json!({"algorithm": "HMAC-SHA256", "user_id": ASID, "issued_at": now});
        for (k, v) in extra.as_object().expect("object") {
            p[k] = v.clone();
        }
        p
    };
    let cases = [
        (
            "Login's signed_request (code)",
            payload(json!({"code": "AQD-login-code"})),
            400,
            "code",
        ),
        (
            "Login's signed_request (oauth_token)",
            payload(json!({"oauth_token": "EAAB-token", "expires": now + 3600})),
            400,
            "oauth_token",
        ),
        (
            "no issued_at",
            json!({"algorithm": "HMAC-SHA256", "user_id": ASID}),
            400,
            "issued_at",
        ),
        (
            "issued two hours ago",
            payload(json!({"issued_at": now - 7200})),
            401,
            "issued_at",
        ),
        (
            "issued in an hour",
            payload(json!({"issued_at": now + 3600})),
            401,
            "issued_at",
        ),
    ];
    for (what, p, expected, message) in cases {
        let request = sign_request(APP_SECRET, &p);
        let (got, json) = post_form(&ingest, &[("signed_request", &request)]).await;
        assert_eq!(got, expected, "{what}: {json}");
        let error = json["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{what}: {error}");
    }
    assert_eq!(env.depth(DELETION_QUEUE).await, 0, "nothing queued");
}

/// Issue 14, item 5: the same callback posted again (a replay, or Meta retrying) is the same
/// request: the same confirmation code, one deletion, one `identity.deleted` per identity.
#[tokio::test]
async fn the_same_callback_twice_is_one_deletion() {
    let env = TestEnv::new().await;
    let events = env.capture_events(&["identity.deleted.#"]).await;
    let (scheduler, _stop) = env.start_scheduler(env.scheduler_config()).await;
    let (ingest, _stop_ingest) = env.start_login_ingest().await;
    let request = signed_request_for(ASID, APP_SECRET);

    let (s, first) = post_form(&ingest, &[("signed_request", &request)]).await;
    assert_eq!(s, 200, "{first}");
    let code = first["confirmation_code"]
        .as_str()
        .expect("code")
        .to_owned();
    eventually(WAIT, "status completed", || async {
        status(&ingest, &code).await.1["status"] == "completed"
    })
    .await;
    let (s, second) = post_form(&ingest, &[("signed_request", &request)]).await;
    assert_eq!(s, 200, "{second}");
    assert_eq!(second, first, "the same answer for the same request");
    eventually(WAIT, "the repeat handled", || async {
        env.depth(DELETION_QUEUE).await == 0
            && metrics_text(scheduler.metrics_addr)
                .await
                .contains("scheduler_data_deletions_total{result=\"duplicate\"} 1")
    })
    .await;
    let got = env
        .deliveries(&events, 3, std::time::Duration::from_secs(2))
        .await;
    assert_eq!(
        got.len(),
        2,
        "one identity.deleted per configured page, once"
    );
    let sql = env.sql().await;
    let receipts: i64 = sql
        .query_one("SELECT count(*) FROM data_deletions", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(receipts, 1);
}
