//! The pooler rule: behind PgBouncer in transaction mode the workers refuse to start (with a
//! message naming the fix) before touching the database; behind PgBouncer in session mode the
//! pipeline runs as against PostgreSQL itself.

use lc_shared::db::DbError;
use lc_testkit::pgbouncer::{PgBouncer, PoolMode};
use lc_testkit::pipeline::{
    PAGE, TestEnv, WAIT, body, count, optin_item, optin_state, post_signed,
};
use lc_worker::runtime::config::StartError;
use time::OffsetDateTime;

#[tokio::test]
async fn transaction_mode_is_refused_at_start_up_before_any_migration() {
    let env = TestEnv::new().await;
    let bouncer = PgBouncer::start(PoolMode::Transaction)
        .await
        .expect("a PgBouncer in transaction mode");
    let mut args = env.worker_args();
    args.database.database_url = bouncer.url(&env.db.name);

    let error = match args.prepare_database().await {
        Ok(_) => panic!("the worker started behind a transaction-mode pooler"),
        Err(e) => e,
    };
    assert!(
        matches!(error, StartError::Db(DbError::TransactionPooler { .. })),
        "{error}"
    );
    let text = error.to_string();
    eprintln!("{text}");
    assert!(
        text.contains("transaction or statement mode") && text.contains("pool_mode = session"),
        "{text}"
    );
    let sql = env.sql().await;
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'refinery_schema_history'"
        )
        .await,
        0,
        "no migration ran"
    );
}

#[tokio::test]
async fn session_mode_carries_an_optin_to_its_message() {
    let env = TestEnv::new().await;
    let bouncer = PgBouncer::start(PoolMode::Session)
        .await
        .expect("a PgBouncer in session mode");
    let mut config = env.scheduler_config();
    config.worker.database.database_url = bouncer.url(&env.db.name);
    let mut pipeline = env.start_pipeline(config).await;

    let now = OffsetDateTime::now_utc();
    assert_eq!(
        post_signed(
            &pipeline.ingest,
            body(PAGE, vec![optin_item(PAGE, "L-bouncer", now)])
        )
        .await,
        200
    );
    let calls = env
        .graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("the first message is sent");
    assert_eq!(calls[0].body["recipient"]["login_id"], "L-bouncer");
    let sql = env.sql().await;
    lc_testkit::pipeline::eventually(WAIT, "the opt-in is sent", || {
        let sql = &sql;
        async move { optin_state(sql, "L-bouncer").await.as_deref() == Some("sent") }
    })
    .await;
    pipeline.stop().await;
}
