//! App binding (issue 16): a page bound to an app in the registry accepts only deliveries
//! its app signed — a secret of client A cannot sign events for client B's page — while the
//! rest of a delivery goes on; without apps in the registry every configured secret signs
//! every page as before; the watchdog checks each page for its own app.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use lc_ingest::binding::SecretVars;
use lc_ingest::{IngestConfig, RunningIngest};
use lc_meta::pages::{FirstMessage, PagesConfig};
use lc_meta::secret::Secret;
use lc_meta::signature::sign_sha256;
use lc_shared::amqp::header_str;
use lc_shared::shutdown::Shutdown;
use lc_shared::topology;
use lc_testkit::fake_graph::{FAKE_APP_ID, FakeGraph};
use lc_testkit::harness::take_all;
use lc_testkit::pipeline::{
    APP_SECRET, PAGE, TestEnv, WAIT, eventually, ingest_config, metrics_text, optin_item,
    start_ingest_with,
};
use lc_worker::graph::GraphClient;
use lc_worker::registry::model::NewApp;
use lc_worker::registry::store::{self, PageRow};
use lc_worker::watchdog::{AppIds, PageCheck, REQUIRED_FIELDS, WatchdogMetrics, check_round};
use serde_json::{Value, json};
use time::OffsetDateTime;

const APP_A: &str = "410000000000001";
const APP_B: &str = "420000000000002";
const SECRET_A: &str = "secret-of-client-a";
const SECRET_B: &str = "secret-of-client-b";
const VAR_A: &str = "LC_TEST_CLIENT_A_SECRET";
const VAR_B: &str = "LC_TEST_CLIENT_B_SECRET";
const PA: &str = "4100000001";
const PB: &str = "4200000002";

/// Inserts app `app` (secret in `var`) unless it exists, and page `page` bound to it (or
/// to no app).
async fn add_page(pool: &Pool, page: &str, app: Option<(&str, &str)>) {
    let c = pool.get().await.expect("client");
    if let Some((app_id, var)) = app {
        store::insert_app(
            &c,
            &NewApp {
                app_id: app_id.into(),
                app_secret_env: var.into(),
                login_app_id: None,
                client_token_env: None,
            },
        )
        .await
        .expect("app");
    }
    let first = serde_json::to_value(FirstMessage {
        text: "Hi".into(),
        quick_replies: vec![],
        variants: vec![],
    })
    .expect("json");
    assert!(
        store::insert_page(
            &c,
            &PageRow {
                page_id: page,
                app_id: app.map(|(a, _)| a),
                name: None,
                first_message: &first,
                rate_limit: None,
            },
        )
        .await
        .expect("page")
    );
}

/// Ingest reading the bindings of this test's database, with both clients' secrets in its
/// (explicit) environment and [`APP_SECRET`] as `META_APP_SECRETS`.
fn config(env: &TestEnv) -> IngestConfig {
    let mut config = ingest_config(env.vhost.url());
    config.login.database_url = Some(Secret::new(env.db.url()));
    config.secret_vars = SecretVars::given([
        (VAR_A.to_owned(), Secret::new(SECRET_A)),
        (VAR_B.to_owned(), Secret::new(SECRET_B)),
    ]);
    config
}

async fn start(env: &TestEnv) -> (RunningIngest, Shutdown) {
    start_ingest_with(config(env)).await
}

fn entry(page: &str, login_id: &str) -> Value {
    json!({"id": page, "time": 1_700_000_000_000_i64,
           "messaging": [optin_item(page, login_id, OffsetDateTime::now_utc())]})
}

fn delivery(entries: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"object": "page", "entry": entries})).expect("json")
}

async fn post(ingest: &RunningIngest, body: Vec<u8>, secret: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://{}/webhook", ingest.addr))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign_sha256(secret, &body))
        .body(body)
        .send()
        .await
        .expect("post")
        .status()
        .as_u16()
}

/// The login ids on the scheduler's queue and the set-aside messages' (page, reason text),
/// taken off the queues.
async fn taken(env: &TestEnv) -> (Vec<String>, Vec<(String, String)>) {
    let conn = env.vhost.connect().await;
    let login_ids = take_all(&conn, topology::SCHEDULER_QUEUE)
        .await
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_slice(&d.data).expect("json");
            login_id(&v).unwrap_or_default()
        })
        .collect();
    let set_aside = take_all(&conn, topology::UNPARSED_QUEUE)
        .await
        .iter()
        .map(|d| {
            let v: Value = serde_json::from_slice(&d.data).expect("json");
            let page = v["entry"][0]["id"].as_str().unwrap_or_default().to_owned();
            (
                page,
                header_str(&d.properties, topology::ERROR_HEADER).expect("reason"),
            )
        })
        .collect();
    (login_ids, set_aside)
}

/// The `login_id` anywhere in `v` (also inside a string holding JSON).
fn login_id(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m
            .get("login_id")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| m.values().find_map(login_id)),
        Value::Array(a) => a.iter().find_map(login_id),
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .as_ref()
            .and_then(login_id),
        _ => None,
    }
}

fn counter(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_page_accepts_only_deliveries_its_apps_secret_signed() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    add_page(&pool, PA, Some((APP_A, VAR_A))).await;
    add_page(&pool, PB, Some((APP_B, VAR_B))).await;
    let (ingest, shutdown) = start(&env).await;

    // Client A's secret on client B's page: 200 (Meta must not retry), nothing published.
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LX")]), SECRET_A).await,
        200
    );
    let (optins, set_aside) = taken(&env).await;
    assert!(optins.is_empty(), "{optins:?}");
    assert_eq!(set_aside.len(), 1);
    assert_eq!(set_aside[0].0, PB);
    assert!(
        set_aside[0].1.starts_with("page_bound_to_other_app: page 4200000002 is bound to app 420000000000002 but the delivery was signed by 410000000000001"),
        "{}",
        set_aside[0].1
    );
    assert!(!set_aside[0].1.contains(SECRET_A) && !set_aside[0].1.contains(SECRET_B));

    // Client B's own secret: accepted.
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LB")]), SECRET_B).await,
        200
    );
    let (optins, set_aside) = taken(&env).await;
    assert_eq!(optins, ["LB"]);
    assert!(set_aside.is_empty());

    // A mixed delivery signed by A: PA's entry goes on, PB's is set aside.
    let mixed = delivery(vec![entry(PA, "LM_A"), entry(PB, "LM_B")]);
    assert_eq!(post(&ingest, mixed, SECRET_A).await, 200);
    let (optins, set_aside) = taken(&env).await;
    assert_eq!(optins, ["LM_A"]);
    assert_eq!(set_aside.len(), 1);
    assert_eq!(set_aside[0].0, PB);

    // The deployment's own secret (META_APP_SECRETS) signs no bound page …
    assert_eq!(
        post(&ingest, delivery(vec![entry(PA, "LA")]), APP_SECRET).await,
        200
    );
    let (optins, set_aside) = taken(&env).await;
    assert!(optins.is_empty());
    assert!(
        set_aside[0].1.contains("signed by META_APP_SECRETS"),
        "{}",
        set_aside[0].1
    );
    // … but a page not bound to an app accepts any known secret, as before.
    for secret in [APP_SECRET, SECRET_A] {
        assert_eq!(
            post(&ingest, delivery(vec![entry(PAGE, "LU")]), secret).await,
            200
        );
    }
    let (optins, _) = taken(&env).await;
    assert_eq!(optins, ["LU", "LU"]);
    // An unknown secret is refused as always.
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LB")]), "nobody").await,
        401
    );

    let metrics = metrics_text(ingest.admin_addr).await;
    assert_eq!(
        counter(
            &metrics,
            "ingest_entries_refused_total{reason=\"page_bound_to_other_app\"}"
        ),
        3,
        "{metrics}"
    );
    assert_eq!(counter(&metrics, "ingest_bound_pages"), 2);
    assert_eq!(counter(&metrics, "ingest_bindings_stale"), 0);
    shutdown.trigger();
}

#[tokio::test]
async fn without_apps_in_the_registry_any_configured_secret_signs_every_page() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    // Pages in the registry but bound to no app: the deployment's own app.
    add_page(&pool, PA, None).await;
    add_page(&pool, PB, None).await;
    let mut config = config(&env);
    config.app_secrets = vec![Secret::new(APP_SECRET), Secret::new(SECRET_A)];
    let (ingest, shutdown) = start_ingest_with(config).await;
    for secret in [APP_SECRET, SECRET_A] {
        let body = delivery(vec![entry(PA, "LA"), entry(PB, "LB")]);
        assert_eq!(post(&ingest, body, secret).await, 200);
    }
    let (optins, set_aside) = taken(&env).await;
    assert_eq!(optins, ["LA", "LB", "LA", "LB"]);
    assert!(set_aside.is_empty());
    shutdown.trigger();
}

#[tokio::test]
async fn a_binding_made_while_ingest_runs_is_in_use_within_a_second() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    let (ingest, shutdown) = start(&env).await;
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LX")]), SECRET_A).await,
        401,
        "no app is registered yet, so A's secret is unknown"
    );
    add_page(&pool, PA, Some((APP_A, VAR_A))).await;
    add_page(&pool, PB, Some((APP_B, VAR_B))).await;
    let bound = Instant::now();
    eventually(WAIT, "ingest reads the new bindings", || async {
        counter(&metrics_text(ingest.admin_addr).await, "ingest_bound_pages") == 2
    })
    .await;
    let took = bound.elapsed();
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LX")]), SECRET_A).await,
        200
    );
    let (optins, set_aside) = taken(&env).await;
    assert!(optins.is_empty());
    assert_eq!(set_aside.len(), 1);
    shutdown.trigger();
}

#[tokio::test]
async fn with_an_unreachable_registry_at_start_deliveries_wait_rather_than_skip_bindings() {
    let env = TestEnv::new().await;
    let mut config = config(&env);
    // Nothing listens on port 1.
    config.login.database_url = Some(Secret::new("postgres://postgres@127.0.0.1:1/none"));
    let (ingest, shutdown) = start_ingest_with(config).await;
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LX")]), SECRET_A).await,
        503
    );
    let ready = reqwest::get(format!("http://{}/readyz", ingest.admin_addr))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 503);
    assert!(ready.text().await.expect("text").contains("app bindings"));
    let metrics = metrics_text(ingest.admin_addr).await;
    assert_eq!(counter(&metrics, "ingest_bindings_stale"), 1);
    assert!(counter(&metrics, "ingest_registry_read_failures_total") >= 1);
    let (optins, set_aside) = taken(&env).await;
    assert!(optins.is_empty() && set_aside.is_empty());
    shutdown.trigger();
}

#[tokio::test]
async fn the_watchdog_checks_a_bound_page_for_its_own_app() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    add_page(&pool, PB, Some((APP_B, VAR_B))).await;
    let fake = FakeGraph::start().await;
    fake.add_page(PAGE, "EAAG-own-page");
    fake.add_page(PB, "EAAG-client-b-page");
    // PB: client B's app subscribed with every field; our own app is not there.
    fake.set_subscription(PB, APP_B, &REQUIRED_FIELDS);
    fake.set_subscription(PAGE, FAKE_APP_ID, &REQUIRED_FIELDS);
    let graph = GraphClient::new(&fake.base_url(), Duration::from_secs(2)).expect("client");
    let text = format!(
        "[[pages]]\nid = \"{PAGE}\"\naccess_token = \"EAAG-own-page\"\n[pages.first_message]\ntext = \"Hi\"\n\
         [[pages]]\nid = \"{PB}\"\naccess_token = \"EAAG-client-b-page\"\n[pages.first_message]\ntext = \"Hi\"\n"
    );
    let pages = PagesConfig::parse(&text, &|_| None).expect("pages");
    let metrics = WatchdogMetrics::new(&prometheus::Registry::new()).expect("metrics");

    let apps = AppIds::load(&pool, Some(FAKE_APP_ID.to_owned()))
        .await
        .expect("apps");
    assert_eq!(apps.of(PB), Some(APP_B));
    assert_eq!(apps.of(PAGE), Some(FAKE_APP_ID));
    let report = check_round(&graph, &pages, &apps, &metrics).await;
    assert_eq!(
        report.pages,
        vec![
            (PAGE.to_owned(), PageCheck::Healthy),
            (PB.to_owned(), PageCheck::Healthy),
        ],
        "PB is checked for app B, not for META_APP_ID"
    );
    assert!(
        !fake.calls().iter().any(|c| c.method == "POST"),
        "nothing re-subscribed"
    );

    // Without META_APP_ID the unbound page is skipped (logged), the bound one still checked.
    let apps = AppIds::load(&pool, None).await.expect("apps");
    let report = check_round(&graph, &pages, &apps, &metrics).await;
    assert_eq!(
        report.pages,
        vec![
            (PAGE.to_owned(), PageCheck::NoApp),
            (PB.to_owned(), PageCheck::Healthy),
        ]
    );
}

#[tokio::test]
async fn when_the_registry_cannot_be_read_the_last_bindings_stay_in_use() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    add_page(&pool, PA, Some((APP_A, VAR_A))).await;
    add_page(&pool, PB, Some((APP_B, VAR_B))).await;
    let (ingest, shutdown) = start(&env).await;
    let sql = env.sql().await;
    // Every read of the registry fails from now on (as with the database unreachable).
    sql.batch_execute("ALTER TABLE registry_version RENAME TO registry_version_away")
        .await
        .expect("rename");
    eventually(WAIT, "ingest notices", || async {
        counter(
            &metrics_text(ingest.admin_addr).await,
            "ingest_bindings_stale",
        ) == 1
    })
    .await;
    let ready = reqwest::get(format!("http://{}/readyz", ingest.admin_addr))
        .await
        .expect("readyz");
    assert_eq!(ready.status().as_u16(), 200, "still ready");
    assert!(ready.text().await.expect("text").contains("stale"));
    // The binding read before still holds: A's secret is refused for PB, B's accepted.
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LX")]), SECRET_A).await,
        200
    );
    assert_eq!(
        post(&ingest, delivery(vec![entry(PB, "LB")]), SECRET_B).await,
        200
    );
    let (optins, set_aside) = taken(&env).await;
    assert_eq!(optins, ["LB"]);
    assert_eq!(set_aside.len(), 1);

    sql.batch_execute("ALTER TABLE registry_version_away RENAME TO registry_version")
        .await
        .expect("rename back");
    eventually(WAIT, "ingest reads the registry again", || async {
        counter(
            &metrics_text(ingest.admin_addr).await,
            "ingest_bindings_stale",
        ) == 0
    })
    .await;
    assert!(
        counter(
            &metrics_text(ingest.admin_addr).await,
            "ingest_registry_read_failures_total"
        ) >= 1
    );
    shutdown.trigger();
}
