//! `docs/openapi.yaml` against the admin API as served: every documented path and method is
//! a route of `lc_worker::admin::routes::ROUTES` (the list the router is built from) and the
//! reverse, and real answers of every route validate against the documented schemas.

use std::collections::BTreeSet;

use lc_testkit::admin::{Answer, READ_TOKEN, WRITE_TOKEN};
use lc_testkit::pipeline::{PAGE, TestEnv, insert_optin};
use lc_worker::admin::routes::ROUTES;
use serde_json::{Value, json};
use time::OffsetDateTime;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn document() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml");
    let text = std::fs::read_to_string(path).expect("docs/openapi.yaml");
    serde_yaml_ng::from_str(&text).expect("openapi.yaml is YAML")
}

fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                out.insert((method.to_owned(), path.clone()));
            }
        }
    }
    out
}

fn served() -> BTreeSet<(String, String)> {
    ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_owned(), r.path.to_owned()))
        .collect()
}

#[test]
fn every_documented_route_is_served_and_every_served_route_is_documented() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    let documented = documented(&doc);
    let served = served();
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not served"
    );
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not documented"
    );
    // Every route documents 401, and every write route 403.
    for r in ROUTES {
        let responses = &doc["paths"][r.path][r.method.as_str()]["responses"];
        assert!(
            responses.get("401").is_some(),
            "{} {} lacks 401",
            r.method.as_str(),
            r.path
        );
        if r.scope == lc_worker::admin::auth::Scope::Write {
            assert!(
                responses.get("403").is_some(),
                "{} {} lacks 403",
                r.method.as_str(),
                r.path
            );
        }
    }
}

/// The schema of `status` for `method path`, or `None` for a documented answer without a
/// body; panics when the status is not documented.
fn schema_of(doc: &Value, method: &str, path: &str, status: u16) -> Option<Value> {
    let mut response = doc["paths"][path][method]["responses"][status.to_string()].clone();
    assert!(
        !response.is_null(),
        "{method} {path} answered {status}, which the document does not list"
    );
    if let Some(r) = response.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().expect("ref");
        response = doc["components"]["responses"][name].clone();
    }
    let schema = response["content"]["application/json"]["schema"].clone();
    (!schema.is_null()).then_some(schema)
}

/// Checks an answer against the document; returns the route it exercised.
fn check(doc: &Value, method: &str, path: &str, answer: &Answer) -> (String, String) {
    match schema_of(doc, method, path, answer.status) {
        None => assert!(
            answer.body.is_null(),
            "{method} {path}: a body where none is documented"
        ),
        Some(schema) => {
            // The document's components beside the schema, so `#/components/...` resolves.
            let root = json!({"components": doc["components"], "allOf": [schema]});
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&root)
                .expect("a valid schema");
            let problems: Vec<String> = validator
                .iter_errors(&answer.body)
                .map(|e| format!("{} at {}", e, e.instance_path()))
                .collect();
            assert!(
                problems.is_empty(),
                "{method} {path} → {}: {problems:?}\n{:#}",
                answer.status,
                answer.body
            );
        }
    }
    (method.to_owned(), path.to_owned())
}

/// method, documented path, real path, token, body.
type Call<'a> = (&'a str, &'a str, String, Option<&'a str>, Option<Value>);

#[tokio::test]
async fn real_answers_of_every_route_match_the_documented_schemas() {
    let env = TestEnv::new().await;
    let admin = env.start_admin().await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, PAGE, "LOGIN-1", now, "pending").await;
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, 'LOGIN-1', 'PSID-1', $2)",
        &[&PAGE, &now],
    )
    .await
    .expect("link");
    insert_optin(&sql, PAGE, "FAILED-1", now, "failed").await;
    sql.execute(
        "UPDATE optins SET failure_reason = 'graph_permanent', attempts = 1, finished_at = now(), \
             last_error_code = 10, last_error_message = 'outside of allowed window' \
         WHERE login_id = 'FAILED-1'",
        &[],
    )
    .await
    .expect("failed opt-in");
    // The dead-letter queues exist once any service declared the topology.
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    lc_shared::topology::declare(&ch).await.expect("topology");
    let _ = conn.close(200, "declared".into()).await;
    let doc = document();
    let mut covered = BTreeSet::new();
    let (app, page) = ("111222333", "6234567890");
    let page_path = "/pages/{page_id}";

    let calls: Vec<Call> = vec![
        ("get", "/apps", "/apps".into(), None, None),
        (
            "post",
            "/apps",
            "/apps".into(),
            Some(READ_TOKEN),
            Some(json!({})),
        ),
        (
            "post",
            "/apps",
            "/apps".into(),
            Some(WRITE_TOKEN),
            Some(json!({"app_id": "x"})),
        ),
        (
            "post",
            "/apps",
            "/apps".into(),
            Some(WRITE_TOKEN),
            Some(json!({"app_id": app, "app_secret_env": "CLIENT_SECRET",
                        "login_app_id": "444555666", "client_token_env": "CLIENT_TOKEN"})),
        ),
        ("get", "/apps", "/apps".into(), Some(READ_TOKEN), None),
        (
            "get",
            "/apps/{app_id}",
            format!("/apps/{app}"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/apps/{app_id}",
            "/apps/1".into(),
            Some(READ_TOKEN),
            None,
        ),
        (
            "post",
            "/pages",
            "/pages".into(),
            Some(WRITE_TOKEN),
            Some(
                json!({"page_id": page, "app_id": app, "first_message": {"text": "Hi",
                        "quick_replies": [{"title": "Yes", "payload": "Y"}]}}),
            ),
        ),
        (
            "post",
            "/pages",
            "/pages".into(),
            Some(WRITE_TOKEN),
            Some(json!({"page_id": PAGE, "first_message": {"text": "File page"}})),
        ),
        ("get", "/pages", "/pages".into(), Some(READ_TOKEN), None),
        (
            "get",
            page_path,
            format!("/pages/{page}"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "patch",
            page_path,
            format!("/pages/{page}"),
            Some(WRITE_TOKEN),
            Some(json!({"rate_limit": 12, "name": "Client C"})),
        ),
        (
            "patch",
            page_path,
            "/pages/1".into(),
            Some(WRITE_TOKEN),
            Some(json!({})),
        ),
        (
            "get",
            "/pages/{page_id}/status",
            format!("/pages/{page}/status"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "put",
            "/pages/{page_id}/token",
            format!("/pages/{page}/token"),
            Some(WRITE_TOKEN),
            Some(json!({"access_token": "EAAG-page-c"})),
        ),
        (
            "put",
            "/pages/{page_id}/token",
            format!("/pages/{page}/token"),
            Some(WRITE_TOKEN),
            Some(json!({"access_token": ""})),
        ),
        (
            "post",
            "/pages/{page_id}/pause",
            format!("/pages/{page}/pause"),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/status",
            format!("/pages/{page}/status"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "post",
            "/pages/{page_id}/resume",
            format!("/pages/{page}/resume"),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "post",
            "/pages/{page_id}/resume",
            "/pages/1/resume".into(),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/optins/{login_id}",
            format!("/pages/{PAGE}/optins/LOGIN-1"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/optins/{login_id}",
            format!("/pages/{PAGE}/optins/NOBODY"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/optins",
            "/optins?login_id=LOGIN-1".into(),
            Some(READ_TOKEN),
            None,
        ),
        ("get", "/optins", "/optins".into(), Some(READ_TOKEN), None),
        ("get", "/funnel", "/funnel".into(), Some(READ_TOKEN), None),
        (
            "get",
            "/funnel",
            format!("/funnel?page_id={PAGE}&from=2026-01-01&to=2026-01-02"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/funnel",
            "/funnel?from=yesterday".into(),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/links",
            format!("/pages/{PAGE}/links?psid=PSID-1"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/links",
            format!("/pages/{PAGE}/links?login_id=LOGIN-1"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/links",
            format!("/pages/{PAGE}/links"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/optins/at-risk",
            "/optins/at-risk?limit=5".into(),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/failures",
            format!("/failures?page_id={PAGE}"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/optins/{login_id}/timeline",
            format!("/pages/{PAGE}/optins/LOGIN-1/timeline"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/pages/{page_id}/optins/{login_id}/timeline",
            format!("/pages/{PAGE}/optins/NOBODY/timeline"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "post",
            "/pages/{page_id}/optins/{login_id}/retry",
            format!("/pages/{PAGE}/optins/FAILED-1/retry"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "post",
            "/pages/{page_id}/optins/{login_id}/retry",
            format!("/pages/{PAGE}/optins/FAILED-1/retry"),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "post",
            "/pages/{page_id}/optins/{login_id}/retry",
            format!("/pages/{PAGE}/optins/LOGIN-1/retry"),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "post",
            "/pages/{page_id}/optins/{login_id}/retry",
            format!("/pages/{PAGE}/optins/NOBODY/retry"),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "get",
            "/dead-letters",
            "/dead-letters".into(),
            Some(READ_TOKEN),
            None,
        ),
        (
            "get",
            "/dead-letters",
            "/dead-letters?queue=nope".into(),
            Some(READ_TOKEN),
            None,
        ),
        (
            "post",
            "/dead-letters/{queue}/replay",
            "/dead-letters/scheduler.optins.dlq/replay".into(),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "post",
            "/dead-letters/{queue}/replay",
            "/dead-letters/scheduler.optins.dlq/replay".into(),
            Some(WRITE_TOKEN),
            Some(json!({"message_id": "absent", "limit": 10})),
        ),
        (
            "post",
            "/dead-letters/{queue}/replay",
            "/dead-letters/scheduler.optins.dlq/replay".into(),
            Some(WRITE_TOKEN),
            Some(json!({"id": "wrong field"})),
        ),
        (
            "delete",
            page_path,
            format!("/pages/{page}"),
            Some(READ_TOKEN),
            None,
        ),
        (
            "delete",
            page_path,
            format!("/pages/{page}"),
            Some(WRITE_TOKEN),
            None,
        ),
        (
            "delete",
            page_path,
            format!("/pages/{page}"),
            Some(WRITE_TOKEN),
            None,
        ),
    ];
    for (method, template, path, token, body) in calls {
        let answer = admin.call(&method.to_uppercase(), &path, token, body).await;
        covered.insert(check(&doc, method, template, &answer));
        if path.starts_with("/optins?") {
            assert_eq!(answer.body["optins"].as_array().map(Vec::len), Some(1));
        }
        if path == "/funnel" {
            // LOGIN-1 and FAILED-1 (the retry route's opt-in), both of today.
            assert_eq!(answer.body["rows"][0]["opted_in"], 2, "{:#}", answer.body);
        }
        if path == "/funnel?from=yesterday" {
            assert!(
                answer.text.contains("from"),
                "names the parameter: {}",
                answer.text
            );
        }
        if path.contains("links?") {
            assert_eq!(answer.body["links"][0]["psid"], "PSID-1", "{path}");
        }
    }
    admin.stop().await;
    assert_eq!(covered, served(), "every route exercised");
}

#[test]
fn the_check_refuses_answers_the_document_does_not_describe() {
    let doc = document();
    let answer = |status: u16, body: Value| Answer {
        status,
        text: body.to_string(),
        body,
    };
    let wrong_shape = answer(200, json!({"page_id": 5}));
    let undocumented = answer(418, json!({}));
    for (what, a) in [
        ("a wrong shape", wrong_shape),
        ("an undocumented status", undocumented),
    ] {
        let caught = std::panic::catch_unwind(|| check(&doc, "get", "/pages/{page_id}", &a));
        assert!(caught.is_err(), "{what} passed the check");
    }
}
