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
