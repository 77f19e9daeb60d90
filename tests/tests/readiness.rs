//! `/readyz` explains itself (issue 17): every process answers JSON with one check per
//! dependency and the reason of a failure — a lost broker (ingest and a worker), a worker's
//! unreachable database, and Graph failing for the scheduler, which only degrades it (`200`)
//! — and each comes back by itself. Reasons carry no passwords.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use lc_testkit::fake_graph::FakeResponse;
use lc_testkit::harness::{TestVhost, postgres_base};
use lc_testkit::pipeline::{PAGE, TestEnv, WAIT, body, optin_item, post_signed};
use lc_worker::cli::Cli;
use serde_json::Value;
use time::OffsetDateTime;

/// A password put into `DATABASE_URL` (trust authentication ignores it) that no answer may
/// show.
const DB_PASSWORD: &str = "readyz-s3cret-pw";

/// The status and JSON body of `/readyz` at `addr`.
async fn readyz(addr: SocketAddr) -> (u16, Value) {
    let answer = reqwest::get(format!("http://{addr}/readyz"))
        .await
        .expect("readyz");
    let status = answer.status().as_u16();
    let content_type = answer
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/json");
    let text = answer.text().await.expect("text");
    (status, serde_json::from_str(&text).expect("readyz is JSON"))
}

/// Waits until `/readyz` at `addr` answers `status` with a body for which `test` holds;
/// returns that body.
async fn readyz_until(
    addr: SocketAddr,
    status: u16,
    what: &str,
    test: fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, body) = readyz(addr).await;
        if got == status && test(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: last answer {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_ok(body: &Value, name: &str) -> bool {
    body["checks"][name]["ok"] == Value::Bool(true)
}

fn reason(body: &Value, name: &str) -> String {
    body["checks"][name]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_lost_broker_is_named_by_ingest_and_a_worker_until_it_is_back() {
    let env = TestEnv::new().await;
    let (ingest, ingest_stop) = env.start_ingest().await;
    let (correlator, correlator_stop) = env.start_correlator().await;

    let body = readyz_until(ingest.admin_addr, 200, "ingest ready", |b| {
        b["status"] == "ready"
    })
    .await;
    assert!(
        check_ok(&body, "broker") && check_ok(&body, "shutdown"),
        "{body}"
    );
    assert!(
        body["checks"].get("app_bindings").is_none(),
        "no DATABASE_URL, no bindings check: {body}"
    );
    let body = readyz_until(correlator.metrics_addr, 200, "correlator ready", |b| {
        b["status"] == "ready"
    })
    .await;
    for name in ["broker", "database", "tasks", "shutdown"] {
        assert!(check_ok(&body, name), "{name}: {body}");
        assert_eq!(body["checks"][name]["required"], true, "{name}");
    }
    assert!(
        body["checks"].get("graph").is_none(),
        "the correlator calls no Graph"
    );

    // Deleting the vhost closes every connection into it and refuses new ones.
    env.vhost.delete_now();
    for link in [&ingest.broker, &correlator.broker] {
        link.wait_down(WAIT).await.expect("the link notices");
    }
    let body = readyz_until(ingest.admin_addr, 503, "ingest names the broker", |b| {
        b["status"] == "not_ready" && b["checks"]["broker"]["ok"] == false
    })
    .await;
    let why = reason(&body, "broker");
    assert!(!why.is_empty(), "{body}");
    assert!(!why.contains("guest:guest"), "no password in {why}");
    assert!(check_ok(&body, "shutdown"), "only the broker fails: {body}");
    let body = readyz_until(
        correlator.metrics_addr,
        503,
        "the correlator names the broker and its consumer",
        |b| b["checks"]["broker"]["ok"] == false && b["checks"]["tasks"]["ok"] == false,
    )
    .await;
    assert!(
        reason(&body, "tasks").contains("correlator.replies consumer"),
        "{body}"
    );
    assert!(check_ok(&body, "database"), "{body}");
    assert!(!body.to_string().contains("guest:guest"), "{body}");

    TestVhost::create_named(&env.vhost.name);
    readyz_until(ingest.admin_addr, 200, "ingest back", |b| {
        b["status"] == "ready"
    })
    .await;
    readyz_until(correlator.metrics_addr, 200, "correlator back", |b| {
        b["status"] == "ready"
    })
    .await;

    ingest_stop.trigger();
    correlator_stop.trigger();
    correlator.task.await.expect("correlator stops");
}

/// `ALTER DATABASE … ALLOW_CONNECTIONS` from the server's `postgres` database, and every
/// open session of the test database ended, as an outage would.
async fn allow_connections(db: &str, allow: bool) {
    let (client, conn) = tokio_postgres::connect(
        &format!("{}/postgres", postgres_base()),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect to postgres");
    let task = tokio::spawn(conn);
    client
        .batch_execute(&format!(
            "ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS {allow}"
        ))
        .await
        .expect("alter database");
    if !allow {
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&db],
            )
            .await
            .expect("end sessions");
    }
    drop(client);
    task.abort();
}

#[tokio::test]
async fn a_worker_without_its_database_is_not_ready_and_says_why_without_the_password() {
    let env = TestEnv::new().await;
    let mut config = env.correlator_config();
    config.worker.database.database_url =
        env.db
            .url()
            .replacen("://postgres@", &format!("://postgres:{DB_PASSWORD}@"), 1);
    assert!(config.worker.database.database_url.contains(DB_PASSWORD));
    let shutdown = lc_shared::shutdown::Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let correlator = lc_worker::correlator::start(config, listener, shutdown.clone())
        .await
        .expect("start correlator");
    let addr = correlator.metrics_addr;
    readyz_until(addr, 200, "ready", |b| b["status"] == "ready").await;

    allow_connections(&env.db.name, false).await;
    let body = readyz_until(addr, 503, "the database check fails", |b| {
        b["checks"]["database"]["ok"] == false
    })
    .await;
    assert_eq!(body["status"], "not_ready");
    let why = reason(&body, "database");
    assert!(why.contains("database"), "{why}");
    assert!(why.contains("DATABASE_URL"), "says what to check: {why}");
    assert!(check_ok(&body, "broker"), "{body}");
    assert!(!body.to_string().contains(DB_PASSWORD), "{body}");
    // The compose health check's probe fails and prints why.
    let probe = Cli::try_parse_from(["loginconnect", "probe", &format!("http://{addr}/readyz")])
        .expect("arguments");
    let failed = lc_worker::cli::run(probe, &mut Vec::new())
        .await
        .expect_err("not ready");
    assert!(failed.to_string().contains("DATABASE_URL"), "{failed}");

    allow_connections(&env.db.name, true).await;
    readyz_until(addr, 200, "ready again", |b| b["status"] == "ready").await;
    shutdown.trigger();
    correlator.task.await.expect("stops");
}

#[tokio::test]
async fn graph_failing_degrades_the_scheduler_but_keeps_it_ready() {
    let env = TestEnv::new().await;
    let mut config = env.scheduler_config();
    // The failed send is retried only after the test is over, so its state stays put.
    config.retry_base_ms = 600_000;
    config.retry_cap_secs = 600;
    config.retry_jitter = false;
    let mut p = env.start_pipeline(config).await;
    let addr = p.scheduler().metrics_addr;
    let answer = readyz_until(addr, 200, "scheduler ready", |b| b["status"] == "ready").await;
    assert!(check_ok(&answer, "graph"), "{answer}");
    assert_eq!(answer["checks"]["graph"]["required"], false);
    assert!(
        reason(&answer, "graph").contains("no Graph call"),
        "before any call it says so: {answer}"
    );
    for name in ["broker", "database", "tasks", "shutdown"] {
        assert!(check_ok(&answer, name), "{name}: {answer}");
    }

    env.graph
        .script("L-bad-gateway", vec![FakeResponse::ServerError(502)]);
    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(
            &p.ingest,
            body(PAGE, vec![optin_item(PAGE, "L-bad-gateway", now)])
        )
        .await,
        200
    );
    let answer = readyz_until(addr, 200, "graph reported failing", |b| {
        b["checks"]["graph"]["ok"] == false
    })
    .await;
    assert_eq!(answer["status"], "degraded", "{answer}");
    let why = reason(&answer, "graph");
    assert!(why.contains("HTTP 502"), "{why}");
    assert!(!why.contains(lc_testkit::pipeline::PAGE_TOKEN), "{why}");

    // The next call reaches Graph: fine again, without a restart.
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "L-fine", now)])).await,
        200
    );
    env.graph
        .wait_for_send_calls(2, WAIT)
        .await
        .expect("the second opt-in is sent");
    let answer = readyz_until(addr, 200, "graph fine again", |b| b["status"] == "ready").await;
    assert!(check_ok(&answer, "graph"), "{answer}");
    p.stop().await;
}
