//! Secrets stay secret (invariant 12): the whole pipeline runs in-process at debug log level
//! with recognisable secret values, through its success and error paths, and then every
//! output is searched for them: log lines, `/metrics` of each service, ingest's error
//! answers, dead-letter and unparsed messages (headers and bodies), public events, what the
//! fake Graph received (path, query and body: the token belongs only in `Authorization`),
//! and the `Debug` text of every configuration struct. A client app's secret (app binding)
//! is among them: a delivery it may not sign is set aside with a reason naming apps only.
//!
//! One test function on purpose: the log capture is the process-wide subscriber, which a
//! second test in the same binary would share.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lc_ingest::IngestConfig;
use lc_meta::pages::PagesConfig;
use lc_meta::secret::Secret;
use lc_meta::signature::{SignatureVerifier, sign_sha256};
use lc_shared::topology;
use lc_testkit::fake_graph::{FakeResponse, TokenSource};
use lc_testkit::harness::take_all;
use lc_testkit::pipeline::{PAGE, TestEnv, body, optin_item, reply_item, start_ingest_with};
use lc_worker::graph::GraphClient;
use time::OffsetDateTime;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const APP_SECRET: &str = "SECRET-appsecret-6b1f0e93d2";
const OLD_APP_SECRET: &str = "SECRET-oldappsecret-a83c55e017";
const VERIFY_TOKEN: &str = "SECRET-verifytoken-41d7c2b8f5";
const PAGE_TOKEN: &str = "SECRET-pagetoken-EAAG9c0ffee77";
const PROOF_SECRET: &str = "SECRET-proofappsecret-5e2a19d4";
/// A page token given to the admin API.
const API_PAGE_TOKEN: &str = "SECRET-apipagetoken-EAAG77d15ea5e";
/// A client app's secret, given to ingest through the variable the registry names.
const CLIENT_APP_SECRET: &str = "SECRET-clientappsecret-0d9b7e21";
const SECRETS: [&str; 9] = [
    CLIENT_APP_SECRET,
    APP_SECRET,
    OLD_APP_SECRET,
    VERIFY_TOKEN,
    PAGE_TOKEN,
    PROOF_SECRET,
    API_PAGE_TOKEN,
    lc_testkit::admin::READ_TOKEN,
    lc_testkit::admin::WRITE_TOKEN,
];
const WAIT: Duration = Duration::from_secs(30);

/// Every log line of the process, as text.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = LogBuffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The places searched, each with its text.
#[derive(Default)]
struct Outputs(Vec<(String, String)>);

impl Outputs {
    fn add(&mut self, place: impl Into<String>, text: impl Into<String>) {
        self.0.push((place.into(), text.into()));
    }

    /// Every (place, secret) pair where the secret shows up.
    fn leaks(&self) -> Vec<String> {
        let mut found = Vec::new();
        for (place, text) in &self.0 {
            for secret in SECRETS {
                if let Some(at) = text.find(secret) {
                    let start = at.saturating_sub(120);
                    let context: String = text[start..].chars().take(240).collect();
                    found.push(format!("{secret} in {place}: …{context}…"));
                }
            }
        }
        found
    }
}

/// A page of a client app.
const CLIENT_PAGE: &str = "7234567890";

/// Ingest with `DATABASE_URL`, after binding [`CLIENT_PAGE`] to a client app whose secret is
/// in `CLIENT_APP_SECRET_VAR` (given explicitly, not through the process environment).
async fn bound_ingest_config(env: &TestEnv) -> IngestConfig {
    let pool = env.migrated_pool(1).await;
    let c = pool.get().await.expect("client");
    let app = lc_worker::registry::model::NewApp {
        app_id: "730000000000001".into(),
        app_secret_env: "CLIENT_APP_SECRET_VAR".into(),
        login_app_id: None,
        client_token_env: None,
    };
    lc_worker::registry::store::insert_app(&c, &app)
        .await
        .expect("app");
    let first = serde_json::json!({"text": "Hi"});
    let page = lc_worker::registry::store::PageRow {
        page_id: CLIENT_PAGE,
        app_id: Some("730000000000001"),
        name: None,
        first_message: &first,
        rate_limit: None,
    };
    lc_worker::registry::store::insert_page(&c, &page)
        .await
        .expect("page");
    let mut config = ingest_config(&env.vhost.url());
    config.login.database_url = Some(Secret::new(env.db.url()));
    config.secret_vars = lc_ingest::binding::SecretVars::given([(
        "CLIENT_APP_SECRET_VAR".to_owned(),
        Secret::new(CLIENT_APP_SECRET),
    )]);
    config
}

fn write_pages_file(path: &std::path::Path) {
    let text = format!(
        r#"[[pages]]
id = "{PAGE}"
access_token = "{PAGE_TOKEN}"
app_secret = "{PROOF_SECRET}"
[pages.first_message]
text = "Thanks for signing up!"
quick_replies = [ {{ title = "Talk to an agent", payload = "AGENT" }} ]
"#
    );
    std::fs::write(path, text).expect("write pages file");
}

/// Ingest accepting this test's secrets (two app secrets, as during a rotation), with a
/// small body limit so the 413 answer is cheap to provoke.
fn ingest_config(amqp_url: &str) -> IngestConfig {
    let mut config = lc_testkit::pipeline::ingest_config(amqp_url.to_owned());
    config.app_secrets = vec![Secret::new(APP_SECRET), Secret::new(OLD_APP_SECRET)];
    config.verify_token = Secret::new(VERIFY_TOKEN);
    config.max_body_bytes = 64 * 1024;
    config.confirm_timeout_ms = 5000;
    config.request_timeout_ms = 5000;
    config
}

async fn get_text(http: &reqwest::Client, url: String) -> (u16, String) {
    let r = http.get(url).send().await.expect("get");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_errors_queues_urls_or_debug_output() {
    let logs = LogBuffer::default();
    tracing_subscriber::registry()
        .with(EnvFilter::new("debug"))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(logs.clone()),
        )
        .try_init()
        .expect("the capture must be the process-wide subscriber");
    let mut out = Outputs::default();
    // No connection reuse: ingest closes idle keep-alive connections after its request
    // timeout, and a pooled connection reused at that moment fails with IncompleteMessage
    // (a client-side race unrelated to what this test checks).
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");

    let env = TestEnv::new().await;
    write_pages_file(&env.pages_file);
    env.graph.set_token(PAGE, PAGE_TOKEN);
    env.graph.require_appsecret_proof(PAGE, PROOF_SECRET);
    // The public events of PAGE only: `#` also brings operational events, and the client
    // page's accepted opt-in below ends `failed` (unknown page) — either would be counted in
    // place of the retried opt-in's `first_message.sent` and let the test look at the Graph
    // calls before the retry.
    let capture = env
        .capture_events(&[
            &format!("first_message.*.{PAGE}"),
            &format!("identity.*.{PAGE}"),
        ])
        .await;

    // Started one by one rather than as a `Pipeline`: the test prints each configuration, and
    // stops the services without judging how they stop (that is not what it is about).
    let ingest_cfg = ingest_config(&env.vhost.url());
    let (ingest, ingest_stop) = start_ingest_with(ingest_cfg.clone()).await;
    let scheduler_cfg = env.scheduler_config();
    let (scheduler, scheduler_stop) = env.start_scheduler(scheduler_cfg.clone()).await;
    let correlator_cfg = env.correlator_config();
    let (correlator, correlator_stop) = env.start_correlator().await;

    // App binding: a second ingest reads the registry, where a client page is bound to a
    // client app; a delivery for that page signed with the deployment's secret is set aside
    // (its reason names the apps, never a secret) and one signed with the client's accepted.
    let bound_cfg = bound_ingest_config(&env).await;
    let (bound_ingest, bound_stop) = start_ingest_with(bound_cfg.clone()).await;
    for secret in [APP_SECRET, CLIENT_APP_SECRET] {
        let delivery = body(
            CLIENT_PAGE,
            vec![optin_item(
                CLIENT_PAGE,
                "login-client",
                OffsetDateTime::now_utc(),
            )],
        );
        let answer = http
            .post(format!("http://{}/webhook", bound_ingest.addr))
            .header("x-hub-signature-256", sign_sha256(secret, &delivery))
            .body(delivery)
            .send()
            .await
            .expect("post");
        assert_eq!(answer.status(), 200);
    }
    out.add("bound IngestConfig", format!("{bound_cfg:?}"));
    out.add(
        "bound ingest /metrics",
        http.get(format!("http://{}/metrics", bound_ingest.admin_addr))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .unwrap_or_default(),
    );
    bound_stop.trigger();
    let _ = tokio::time::timeout(WAIT, bound_ingest.task).await;

    // The handshake, right and wrong.
    let base = format!("http://{}", ingest.addr);
    let handshake = |token: &str| {
        let url = reqwest::Url::parse_with_params(
            &format!("{base}/webhook"),
            &[
                ("hub.mode", "subscribe"),
                ("hub.verify_token", token),
                ("hub.challenge", "ch-1"),
            ],
        )
        .expect("url");
        http.get(url).send()
    };
    let ok = handshake(VERIFY_TOKEN).await.expect("handshake");
    assert_eq!(ok.status(), 200);
    let refused = handshake("SECRET-verifytoken-41d7c2b8f6")
        .await
        .expect("handshake");
    assert_eq!(refused.status(), 403);
    out.add(
        "403 answer of the handshake",
        refused.text().await.unwrap_or_default(),
    );

    // Refused deliveries: unsigned, wrongly signed, signed with a near-miss secret, too big.
    let delivery = body(
        PAGE,
        vec![optin_item(PAGE, "unused", OffsetDateTime::now_utc())],
    );
    let post = |body: Vec<u8>, sig: Option<String>| {
        let mut req = http
            .post(format!("{base}/webhook"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(sig) = sig {
            req = req.header("x-hub-signature-256", sig);
        }
        req.send()
    };
    for (what, sig) in [
        ("unsigned", None),
        ("malformed signature", Some("sha256=zz".to_owned())),
        (
            "wrong secret",
            Some(sign_sha256("SECRET-appsecret-6b1f0e93d3", &delivery)),
        ),
    ] {
        let r = post(delivery.clone(), sig).await.expect("post");
        assert_eq!(r.status(), 401, "{what}");
        out.add(
            format!("401 answer ({what})"),
            r.text().await.unwrap_or_default(),
        );
    }
    let big = vec![b'x'; 128 * 1024];
    let r = post(big.clone(), Some(sign_sha256(APP_SECRET, &big)))
        .await
        .expect("post");
    assert_eq!(r.status(), 413);
    out.add("413 answer", r.text().await.unwrap_or_default());

    // Graph answers: an error that echoes the token and the app secret (must be scrubbed
    // before it reaches logs or the failed event), a transient error, and success.
    let now = OffsetDateTime::now_utc();
    env.graph.script(
        "login-echo",
        vec![FakeResponse::Error {
            http_status: 400,
            code: 100,
            subcode: None,
            message: format!(
                "(#100) Invalid parameter access_token={PAGE_TOKEN} proof_key={PROOF_SECRET}"
            ),
        }],
    );
    env.graph
        .script("login-retry", vec![FakeResponse::unexpected()]);
    let optins = body(
        PAGE,
        vec![
            optin_item(PAGE, "login-echo", now),
            optin_item(PAGE, "login-retry", now),
            optin_item(PAGE, "login-ok", now),
        ],
    );
    let r = post(optins.clone(), Some(sign_sha256(OLD_APP_SECRET, &optins)))
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let conn = env.vhost.connect().await;
    // failed (login-echo) and sent ×2 first; the reply after them, so login-ok is `sent`.
    let mut events = env.deliveries(&capture, 3, WAIT).await;
    assert_eq!(events.len(), 3, "expected 3 first_message events");
    let reply = body(
        PAGE,
        vec![reply_item(
            PAGE,
            "9000000000000001",
            "m_secret_1",
            "login-ok",
            now,
        )],
    );
    assert_eq!(
        post(reply.clone(), Some(sign_sha256(APP_SECRET, &reply)))
            .await
            .expect("post")
            .status(),
        200
    );
    events.extend(env.deliveries(&capture, 1, WAIT).await);
    assert_eq!(events.len(), 4, "expected identity.linked too");
    // Not JSON: refused with 400 (not a webhook body), nothing stored.
    let not_json = b"not json at all".to_vec();
    let refused = post(not_json.clone(), Some(sign_sha256(APP_SECRET, &not_json)))
        .await
        .expect("post");
    assert_eq!(refused.status(), 400);
    out.add(
        "ingest 400 answer".to_owned(),
        refused.text().await.unwrap_or_default(),
    );
    // A JSON object that is no delivery: kept on the unparsed queue.
    let garbage = br#"{"object":"not a page","entry":"x"}"#.to_vec();
    assert_eq!(
        post(garbage.clone(), Some(sign_sha256(APP_SECRET, &garbage)))
            .await
            .expect("post")
            .status(),
        200
    );

    // A poison message straight onto the correlator's queue: it ends dead-lettered.
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_publish(
        "".into(),
        topology::CORRELATOR_QUEUE.into(),
        BasicPublishOptions::default(),
        b"\xff poison",
        BasicProperties::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");

    for e in &events {
        out.add(
            "public event",
            String::from_utf8_lossy(&e.data).into_owned(),
        );
    }
    lc_testkit::pipeline::eventually(WAIT, "poison message dead-lettered", || async {
        let ch = conn.create_channel().await.expect("channel");
        lc_testkit::harness::queue_depth(
            &ch,
            &topology::dead_letter_queue(topology::CORRELATOR_QUEUE),
        )
        .await
            == 1
    })
    .await;
    for queue in [
        topology::dead_letter_queue(topology::CORRELATOR_QUEUE),
        topology::UNPARSED_QUEUE.to_owned(),
    ] {
        let kept = take_all(&conn, &queue).await;
        assert!(!kept.is_empty(), "{queue} should hold a message");
        for m in kept {
            out.add(format!("{queue} headers"), format!("{:?}", m.properties));
            out.add(
                format!("{queue} body"),
                String::from_utf8_lossy(&m.data).into_owned(),
            );
        }
    }

    for (name, addr) in [
        ("ingest", ingest.admin_addr),
        ("scheduler", scheduler.metrics_addr),
        ("correlator", correlator.metrics_addr),
    ] {
        let (status, text) = get_text(&http, format!("http://{addr}/metrics")).await;
        assert_eq!(status, 200, "{name} /metrics");
        out.add(format!("/metrics of {name}"), text);
    }

    // The fake Graph: the token only ever in the Authorization header.
    let calls = env.graph.calls();
    assert!(
        calls.iter().filter(|c| c.is_send()).count() >= 4,
        "sends: {calls:?}"
    );
    for c in &calls {
        assert_eq!(
            c.token_source,
            Some(TokenSource::Header),
            "{} {}",
            c.method,
            c.path
        );
        assert_eq!(
            c.authorization.as_deref(),
            Some(format!("Bearer {PAGE_TOKEN}").as_str())
        );
        assert!(
            c.query.contains("appsecret_proof="),
            "proof missing: {}",
            c.query
        );
        out.add(
            format!("Graph call URL {}", c.path),
            format!("{}?{}", c.path, c.query),
        );
        out.add(format!("Graph call body {}", c.path), c.body.to_string());
    }

    // The admin API: a page token replaced through it, near-miss and read-only tokens.
    let admin = env.start_admin().await;
    let api_page = "8234567890";
    let created = admin
        .write(
            "POST",
            "/pages",
            Some(serde_json::json!({"page_id": api_page, "first_message": {"text": "Hi"}})),
        )
        .await;
    assert_eq!(created.status, 201);
    let put = admin
        .write(
            "PUT",
            &format!("/pages/{api_page}/token"),
            Some(serde_json::json!({"access_token": API_PAGE_TOKEN})),
        )
        .await;
    assert_eq!(put.status, 200);
    out.add("admin API token answer", put.text);
    let near_miss = format!("{}x", lc_testkit::admin::WRITE_TOKEN);
    let refused = admin.call("GET", "/pages", Some(&near_miss), None).await;
    assert_eq!(refused.status, 401);
    out.add("admin API 401 answer", refused.text);
    let read_only = admin
        .call(
            "PUT",
            &format!("/pages/{api_page}/token"),
            Some(lc_testkit::admin::READ_TOKEN),
            Some(serde_json::json!({"access_token": API_PAGE_TOKEN})),
        )
        .await;
    assert_eq!(read_only.status, 403);
    out.add("admin API 403 answer", read_only.text);
    for path in ["/pages".to_owned(), format!("/pages/{api_page}/status")] {
        out.add(format!("admin API {path}"), admin.read(&path).await.text);
    }
    admin.stop().await;
    let tokens = lc_worker::admin::auth::AdminTokens::parse(&format!(
        "crm:read:{},ops:write:{}",
        lc_testkit::admin::READ_TOKEN,
        lc_testkit::admin::WRITE_TOKEN
    ))
    .expect("tokens");
    out.add("AdminTokens", format!("{tokens:?}"));

    // Debug output of every configuration and of the objects built from it.
    out.add("IngestConfig", format!("{ingest_cfg:?}"));
    out.add("SchedulerConfig", format!("{scheduler_cfg:?}"));
    out.add("CorrelatorConfig", format!("{correlator_cfg:?}"));
    let pages = PagesConfig::load(&env.pages_file).expect("pages");
    assert_eq!(pages.pages[0].access_token.expose(), PAGE_TOKEN);
    out.add("PagesConfig", format!("{pages:?}"));
    out.add("PageConfig", format!("{:?}", pages.pages[0]));
    let verifier = SignatureVerifier::new(&ingest_cfg.app_secrets, false);
    out.add("SignatureVerifier", format!("{verifier:?}"));
    let client = GraphClient::new(&env.graph.base_url(), Duration::from_secs(1)).expect("client");
    out.add("GraphClient", format!("{client:?}"));

    ingest_stop.trigger();
    scheduler_stop.trigger();
    correlator_stop.trigger();
    let _ = tokio::time::timeout(WAIT, ingest.task).await;
    let _ = tokio::time::timeout(WAIT, scheduler.task).await;
    let _ = tokio::time::timeout(WAIT, correlator.task).await;

    let log_text = logs.text();
    assert!(log_text.contains("DEBUG"), "debug logging was not captured");
    assert!(
        log_text.contains("first message sent"),
        "the pipeline's logs were not captured"
    );
    assert!(
        log_text.contains("Graph call failed"),
        "the Graph error path (which handles the echoed token) did not run"
    );
    assert!(
        log_text.contains("page_bound_to_other_app"),
        "the app binding's refusal path did not run"
    );
    out.add("logs", log_text);
    // The search itself works: a planted secret is found.
    let mut planted = Outputs::default();
    planted.add("planted", format!("Bearer {PAGE_TOKEN}"));
    assert_eq!(planted.leaks().len(), 1);
    let leaks = out.leaks();
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
