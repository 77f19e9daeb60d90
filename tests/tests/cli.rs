//! The operator CLI against a real database, broker and the fake Graph.

use clap::Parser;
use lc_shared::amqp::{self, string_headers};
use lc_shared::topology;
use lc_testkit::harness::{queue_depth, take_all};
use lc_testkit::pipeline::{PAGE, PAGE_TOKEN, TestEnv, body, optin_item};
use lc_worker::cli::{Cli, CliError};
use serde_json::Value;
use time::OffsetDateTime;

async fn cli(env: &TestEnv, args: &[&str]) -> Result<String, CliError> {
    let amqp = env.vhost.url();
    let db = env.db.url();
    let mut argv = vec!["loginconnect", "--amqp-url", &amqp, "--database-url", &db];
    argv.extend_from_slice(args);
    let parsed = Cli::try_parse_from(argv).expect("valid arguments");
    let mut out = Vec::new();
    lc_worker::cli::run(parsed, &mut out).await?;
    Ok(String::from_utf8(out).expect("utf-8 output"))
}

async fn declare(env: &TestEnv) -> lapin::Connection {
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    topology::declare(&ch).await.expect("topology");
    conn
}

#[tokio::test]
async fn migrate_status_optin_and_link_commands() {
    let env = TestEnv::new().await;
    let _conn = declare(&env).await;
    let out = cli(&env, &["migrate"]).await.expect("migrate");
    let version = format!(
        "database at version {}",
        lc_shared::db::latest_migration_version()
    );
    assert!(out.contains(&version), "{out}");
    // Idempotent.
    let out = cli(&env, &["migrate"]).await.expect("migrate again");
    assert!(out.contains("0 migration(s) applied now"), "{out}");

    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         VALUES ($1, 'L1', $2, $2::timestamptz + interval '24 hours', $2, 'pending', $2), \
                ($1, 'L2', $2, $2::timestamptz + interval '24 hours', $2, 'sent', $2)",
        &[&PAGE, &now],
    )
    .await
    .expect("insert");
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, 'L2', 'PSID-2', $2)",
        &[&PAGE, &now],
    )
    .await
    .expect("link");

    let status: Value =
        serde_json::from_str(&cli(&env, &["status", "--json"]).await.expect("status"))
            .expect("json");
    assert_eq!(status["optins_by_state"]["pending"], 1);
    assert_eq!(status["optins_by_state"]["sent"], 1);
    assert!(status["nearest_pending_deadline"].as_str().is_some());
    assert_eq!(status["queues"]["scheduler.optins.dlq"], 0);
    assert_eq!(status["outbox"]["unpublished"], 0);
    let text = cli(&env, &["status"]).await.expect("status text");
    assert!(
        text.contains("pending") && text.contains("scheduler.optins.dlq"),
        "{text}"
    );

    let shown: Value = serde_json::from_str(
        &cli(&env, &["optin", "show", "--page", PAGE, "--login-id", "L1"])
            .await
            .expect("show"),
    )
    .expect("json");
    assert_eq!(shown["state"], "pending");
    let link = cli(&env, &["link", "show", "--psid", "PSID-2"])
        .await
        .expect("link by psid");
    assert!(link.contains("\"login_id\":\"L2\""), "{link}");
    let link = cli(&env, &["link", "show", "--login-id", "L2"])
        .await
        .expect("link by login_id");
    assert!(link.contains("PSID-2"), "{link}");

    let out = cli(
        &env,
        &["optin", "reset", "--page", PAGE, "--login-id", "L2"],
    )
    .await
    .expect("reset");
    assert!(out.contains("1 opt-in(s) and 1 link(s) deleted"), "{out}");
    assert!(
        cli(&env, &["optin", "show", "--page", PAGE, "--login-id", "L2"])
            .await
            .is_err()
    );
    assert!(
        cli(&env, &["link", "show", "--login-id", "L2"])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_and_replayed() {
    let env = TestEnv::new().await;
    let conn = declare(&env).await;
    let ch = amqp::confirm_channel(&conn).await.expect("channel");
    // A message the scheduler dead-lettered (as the consumer does), and a body that did not
    // parse at the time but does now (as after a parser fix).
    let dlq = topology::dead_letter_queue(topology::SCHEDULER_QUEUE);
    let original = br#"{"page_id":"1","kind":"optin"}"#;
    let props =
        amqp::persistent_properties("m-1", "application/json").with_headers(string_headers(&[
            (
                topology::ERROR_HEADER,
                "queued event does not parse: missing field",
            ),
            (topology::ORIGIN_QUEUE_HEADER, topology::SCHEDULER_QUEUE),
            ("x-loginconnect-original-routing-key", "optin.1"),
        ]));
    let c = amqp::publish(
        &ch,
        topology::DEAD_LETTER_EXCHANGE,
        topology::SCHEDULER_QUEUE,
        true,
        original,
        props,
    )
    .await
    .expect("publish");
    amqp::await_confirm(c, std::time::Duration::from_secs(5))
        .await
        .expect("confirm");
    let webhook = body(
        PAGE,
        vec![optin_item(PAGE, "RL1", OffsetDateTime::now_utc())],
    );
    let c = amqp::publish(
        &ch,
        "",
        topology::UNPARSED_QUEUE,
        true,
        &webhook,
        amqp::persistent_properties("u-1", "application/octet-stream"),
    )
    .await
    .expect("publish");
    amqp::await_confirm(c, std::time::Duration::from_secs(5))
        .await
        .expect("confirm");

    let listed = cli(&env, &["dead-letters", "list"]).await.expect("list");
    assert!(
        listed.contains("reason=queued event does not parse"),
        "{listed}"
    );
    assert!(listed.contains("origin=scheduler.optins"), "{listed}");
    assert!(listed.contains("key=optin.1"), "{listed}");
    // Listing does not remove anything (quorum queues return the messages asynchronously
    // after the listing's channel closes).
    let depth_ch = conn.create_channel().await.expect("channel");
    lc_testkit::pipeline::eventually(
        std::time::Duration::from_secs(10),
        "messages back",
        || async {
            queue_depth(&depth_ch, &dlq).await == 1
                && queue_depth(&depth_ch, topology::UNPARSED_QUEUE).await == 1
        },
    )
    .await;

    let out = cli(&env, &["dead-letters", "replay", "--queue", &dlq])
        .await
        .expect("replay dlq");
    assert!(out.contains("replayed 1, kept 0"), "{out}");
    let out = cli(
        &env,
        &[
            "dead-letters",
            "replay",
            "--queue",
            topology::UNPARSED_QUEUE,
        ],
    )
    .await
    .expect("replay unparsed");
    assert!(out.contains("replayed 1, kept 0"), "{out}");
    let back = take_all(&conn, topology::SCHEDULER_QUEUE).await;
    assert_eq!(back.len(), 2);
    assert_eq!(back[0].data.as_slice(), original.as_slice());
    assert_eq!(back[0].routing_key.as_str(), topology::SCHEDULER_QUEUE);
    let replayed: lc_meta::webhook::QueuedEvent =
        serde_json::from_slice(&back[1].data).expect("queued");
    assert_eq!(replayed.page_id, PAGE);
    assert_eq!(queue_depth(&depth_ch, &dlq).await, 0);
    assert_eq!(queue_depth(&depth_ch, topology::UNPARSED_QUEUE).await, 0);

    assert!(
        cli(&env, &["dead-letters", "list", "--queue", "nope"])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn pages_check_validates_the_file_and_each_token() {
    let env = TestEnv::new().await;
    let file = env.pages_file.to_string_lossy().to_string();
    let graph = env.graph.base_url();
    let out = cli(
        &env,
        &[
            "pages",
            "check",
            "--pages-file",
            &file,
            "--graph-api-url",
            &graph,
        ],
    )
    .await
    .expect("token works");
    assert!(out.contains("token works"), "{out}");
    assert!(
        env.graph
            .calls()
            .iter()
            .any(|c| c.authorization.as_deref() == Some(&*format!("Bearer {PAGE_TOKEN}")))
    );

    env.graph.set_token(PAGE, "another-token");
    let err = cli(
        &env,
        &[
            "pages",
            "check",
            "--pages-file",
            &file,
            "--graph-api-url",
            &graph,
        ],
    )
    .await
    .expect_err("token rejected");
    assert!(
        err.to_string().contains("1 page token(s) do not work"),
        "{err}"
    );

    let bad = std::env::temp_dir().join(format!("{}-bad.toml", env.db.name));
    std::fs::write(
        &bad,
        "[[pages]]\nid = \"42\"\naccess_token = \"t\"\n[pages.first_message]\ntext = \"\"\n",
    )
    .expect("write");
    let err = cli(
        &env,
        &[
            "pages",
            "check",
            "--offline",
            "--pages-file",
            &bad.to_string_lossy(),
        ],
    )
    .await
    .expect_err("invalid file");
    let _ = std::fs::remove_file(&bad);
    let text = err.to_string();
    assert!(
        text.contains("42") && text.contains("text"),
        "names the page and the field: {text}"
    );
}

#[tokio::test]
async fn probe_succeeds_only_on_2xx() {
    let env = TestEnv::new().await;
    let (ingest, _stop) = env.start_ingest().await;
    let ok = cli(&env, &["probe", &format!("http://{}/healthz", ingest.addr)])
        .await
        .expect("healthy");
    assert!(ok.contains("200"), "{ok}");
    assert!(
        cli(&env, &["probe", &format!("http://{}/nope", ingest.addr)])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_page_registry_commands_share_the_admin_api_implementation() {
    let env = TestEnv::new().await;
    cli(&env, &["migrate"]).await.expect("migrate");
    let page = "7234567890";
    let out = cli(
        &env,
        &[
            "apps",
            "create",
            "--app-id",
            "555666777",
            "--app-secret-env",
            "CLIENT_D_SECRET",
        ],
    )
    .await
    .expect("apps create");
    assert!(out.contains("CLIENT_D_SECRET"), "{out}");
    let created = cli(
        &env,
        &[
            "pages",
            "create",
            page,
            "--text",
            "Hello D",
            "--quick-reply",
            "Yes=Y",
            "--app",
            "555666777",
            "--rate-limit",
            "9",
        ],
    )
    .await
    .expect("pages create");
    assert!(created.contains("set its token next"), "{created}");
    let refused = cli(
        &env,
        &["pages", "create", page, "--text", &"x".repeat(2000)],
    )
    .await
    .expect_err("too long and existing");
    assert!(
        refused.to_string().contains("first_message.text"),
        "{refused}"
    );

    // What the CLI wrote, the admin API reads (and the reverse).
    let admin = env.start_admin().await;
    let read = admin.read(&format!("/pages/{page}")).await;
    assert_eq!(
        read.body["first_message"]["quick_replies"][0]["payload"],
        "Y"
    );
    assert_eq!(read.body["rate_limit"], 9);
    assert_eq!(read.body["app_id"], "555666777");
    admin
        .write("POST", &format!("/pages/{page}/pause"), None)
        .await;
    let listed = cli(&env, &["pages", "list"]).await.expect("list");
    assert!(
        listed.contains("paused (operator)") && listed.contains("not in the pages file"),
        "{listed}"
    );
    cli(&env, &["pages", "resume", page]).await.expect("resume");
    assert_eq!(
        admin.read(&format!("/pages/{page}/status")).await.body["paused"],
        Value::Null
    );
    admin.stop().await;

    cli(
        &env,
        &[
            "pages",
            "update",
            page,
            "--default-rate-limit",
            "--text",
            "Hi D",
        ],
    )
    .await
    .expect("update");
    let shown: Value =
        serde_json::from_str(&cli(&env, &["pages", "show", page]).await.expect("show"))
            .expect("json");
    assert_eq!(shown["page"]["rate_limit"], Value::Null);
    assert_eq!(shown["page"]["first_message"]["text"], "Hi D");
    assert_eq!(shown["status"]["token"], "missing");
    cli(&env, &["pages", "pause", page]).await.expect("pause");
    cli(&env, &["pages", "delete", page]).await.expect("delete");
    let gone = cli(&env, &["pages", "show", page])
        .await
        .expect_err("deleted");
    assert!(gone.to_string().contains("not in the registry"), "{gone}");
}
