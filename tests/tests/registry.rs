//! The page registry (issue 16): the pages file imported idempotently, a page that left the
//! file reported and kept, and registry changes reaching every scheduler replica within a
//! second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lc_meta::pages::{FirstMessage, PagesConfig};
use lc_shared::shutdown::Shutdown;
use lc_testkit::admin::KEYS;
use lc_testkit::pipeline::{FIRST_TEXT, PAGE, TestEnv, WAIT, eventually, insert_optin};
use lc_worker::registry::model::PageUpdate;
use lc_worker::registry::{import, ops, store};
use lc_worker::scheduler::RunningScheduler;
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::RwLock;

/// A page created through the registry, not in the pages file.
const NEW_PAGE: &str = "3234567890";
const NEW_TOKEN: &str = "EAAG-api-page-token";

fn message(text: &str) -> FirstMessage {
    FirstMessage {
        text: text.into(),
        quick_replies: vec![],
        variants: vec![],
    }
}

#[tokio::test]
async fn the_pages_file_import_is_idempotent_and_a_page_that_left_it_is_kept_and_reported() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let text = std::fs::read_to_string(&env.pages_file).expect("file");
    let file = PagesConfig::parse(&text, &|_| None).expect("pages");
    let mut c = pool.get().await.expect("client");

    let first = import::import_file(&mut c, &file).await.expect("import");
    assert_eq!(first.created, vec![PAGE.to_owned()]);
    let version = store::version(&c).await.expect("version");
    let again = import::import_file(&mut c, &file).await.expect("import");
    assert_eq!(
        again,
        import::ImportReport {
            unchanged: 1,
            ..Default::default()
        }
    );
    assert_eq!(
        store::version(&c).await.expect("version"),
        version,
        "an import that changes nothing does not make replicas reload"
    );

    // An API edit survives an import of the unchanged file.
    let update = PageUpdate {
        first_message: Some(message("Edited through the API")),
        ..Default::default()
    };
    ops::update_page(&c, "test", PAGE, &update)
        .await
        .expect("update");
    import::import_file(&mut c, &file).await.expect("import");
    let page = ops::page(&c, PAGE).await.expect("page");
    assert_eq!(page.first_message["text"], "Edited through the API");

    // The page leaves the file: kept, reported, not deleted; deleting it is allowed now.
    let other = PagesConfig::parse(
        "[[pages]]\nid = \"4234567890\"\naccess_token = \"t\"\n[pages.first_message]\ntext = \"x\"\n",
        &|_| None,
    )
    .expect("other file");
    let left = import::import_file(&mut c, &other).await.expect("import");
    assert_eq!(left.left_file, vec![PAGE.to_owned()]);
    let page = ops::page(&c, PAGE).await.expect("still in the registry");
    assert!(!page.in_pages_file);
    let status = ops::status(&c, PAGE).await.expect("status");
    assert!(!status.in_pages_file);
    let quiet = import::import_file(&mut c, &other).await.expect("import");
    assert!(quiet.left_file.is_empty(), "reported once, when it left");
    let refused = ops::delete_page(&mut c, "test", "4234567890").await;
    assert!(
        matches!(
            refused,
            Err(lc_worker::registry::RegistryError::Conflict(_))
        ),
        "a page in the file is not deleted (the next import would bring it back)"
    );
    ops::delete_page(&mut c, "test", PAGE)
        .await
        .expect("delete");
    assert!(store::page_by_id(&c, PAGE).await.expect("read").is_none());
}

type View = Arc<RwLock<Arc<PagesConfig>>>;

/// Polls both replicas' views until `check` holds for each; returns how long it took.
async fn until_both(views: &[View], what: &str, check: impl Fn(&PagesConfig) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for v in views {
            let view = v.read().await.clone();
            all &= check(&view);
        }
        if all {
            return started.elapsed();
        }
        assert!(started.elapsed() < WAIT, "replicas never saw: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop(all: Vec<(RunningScheduler, Shutdown)>) {
    for (s, stop) in all {
        stop.trigger();
        s.task.await.expect("scheduler stopped");
    }
}

#[tokio::test]
async fn registry_changes_reach_two_scheduler_replicas_within_a_second() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    env.graph.add_page(NEW_PAGE, NEW_TOKEN);
    let mut config = env.scheduler_config();
    config.page_token_keys = KEYS.into();
    let a = env.start_scheduler(config.clone()).await;
    let b = env.start_scheduler(config).await;
    let views = [a.0.pages.clone(), b.0.pages.clone()];
    let admin = env.start_admin().await;

    // A new first message and a rate limit for the file's page, through the admin API.
    let update = json!({"first_message": {"text": "New text from the registry"}, "rate_limit": 7});
    let changed = admin
        .write("PATCH", &format!("/pages/{PAGE}"), Some(update))
        .await;
    assert_eq!(changed.status, 200, "{:?}", changed.body);
    let took = until_both(&views, "the new first message", |p| {
        p.get(PAGE)
            .is_some_and(|p| p.first_message.text == "New text from the registry")
    })
    .await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    eventually(
        WAIT,
        "the page's own rate limit in the shared state",
        || {
            let pool = pool.clone();
            async move {
                let c = pool.get().await.expect("client");
                let rate: i32 = c
                    .query_one(
                        "SELECT rate_limit FROM page_state WHERE page_id = $1",
                        &[&PAGE],
                    )
                    .await
                    .expect("rate")
                    .get(0);
                rate == 7
            }
        },
    )
    .await;

    // A new page with a token, through the admin API.
    let new = json!({"page_id": NEW_PAGE, "name": "Client B",
                     "first_message": {"text": "Welcome to client B"}});
    assert_eq!(admin.write("POST", "/pages", Some(new)).await.status, 201);
    let token = json!({"access_token": NEW_TOKEN});
    let stored = admin
        .write("PUT", &format!("/pages/{NEW_PAGE}/token"), Some(token))
        .await;
    assert_eq!(stored.status, 200, "{:?}", stored.body);
    let took = until_both(&views, "the new page", |p| p.get(NEW_PAGE).is_some()).await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    admin.stop().await;

    // A send uses the new text.
    let sql = env.sql().await;
    insert_optin(&sql, PAGE, "L1", OffsetDateTime::now_utc(), "pending").await;
    insert_optin(&sql, NEW_PAGE, "L2", OffsetDateTime::now_utc(), "pending").await;
    let calls = env
        .graph
        .wait_for_send_calls(2, WAIT)
        .await
        .expect("both sent");
    stop(vec![a, b]).await;
    let text_of = |page: &str| {
        calls.iter().find(|c| c.page_id == page).map(|c| {
            c.body["message"]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
    };
    assert_eq!(text_of(PAGE).as_deref(), Some("New text from the registry"));
    assert_eq!(text_of(NEW_PAGE).as_deref(), Some("Welcome to client B"));
    assert_ne!(FIRST_TEXT, "New text from the registry");
}

#[tokio::test]
async fn a_replicas_view_takes_stored_tokens_first_and_an_apps_secret_from_the_variable_it_names() {
    use lc_worker::registry::model::{NewApp, NewPage};
    use lc_worker::registry::view;
    use lc_worker::scheduler::tokens::TokenKeys;

    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    let mut c = pool.get().await.expect("client");
    let text = std::fs::read_to_string(&env.pages_file).expect("file");
    let file = PagesConfig::parse(&text, &|_| None).expect("pages");
    import::import_file(&mut c, &file).await.expect("import");
    let app = NewApp {
        app_id: "123123123".into(),
        app_secret_env: "CLIENT_E_SECRET".into(),
        login_app_id: None,
        client_token_env: None,
    };
    ops::create_app(&c, "test", &app).await.expect("app");
    for page_id in [NEW_PAGE, "9234567890"] {
        let new = NewPage {
            page_id: page_id.into(),
            app_id: Some("123123123".into()),
            name: None,
            first_message: message("Client E"),
            rate_limit: Some(3),
        };
        ops::create_page(&c, "test", &new).await.expect("page");
    }
    let keys = TokenKeys::parse(KEYS).expect("keys");
    let token = lc_meta::secret::Secret::new(NEW_TOKEN);
    ops::set_token(&mut c, &keys, "test", NEW_PAGE, &token)
        .await
        .expect("token");
    let env_of = |name: &str| (name == "CLIENT_E_SECRET").then(|| "client-e-secret".to_owned());
    let seen = view::build(&c, Some(&file), &keys, &env_of)
        .await
        .expect("view");

    let file_page = seen.config.get(PAGE).expect("the file's page");
    assert_eq!(
        file_page.access_token.expose(),
        file.pages[0].access_token.expose()
    );
    let bound = seen
        .config
        .get(NEW_PAGE)
        .expect("the API page with its stored token");
    assert_eq!(bound.access_token.expose(), NEW_TOKEN);
    assert_eq!(
        bound.app_secret.as_ref().map(|s| s.expose().to_owned()),
        Some("client-e-secret".to_owned())
    );
    assert_eq!(seen.rate_limits.get(NEW_PAGE), Some(&3));
    assert_eq!(
        seen.left_out,
        vec!["9234567890".to_owned()],
        "no token: left out"
    );
}
