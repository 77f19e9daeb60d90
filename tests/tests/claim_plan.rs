//! The claim's per-page walk must read each page's own rows through
//! `optins_pending_by_page`: walking the global deadline index and filtering by page reads
//! every page's backlog for each page (16 pages: 16× the rows, 110–330 ms per claim against
//! 3–8 ms in the drain benchmark), which is what PostgreSQL's default planner costs chose.

use std::time::Duration;

use lc_testkit::pipeline::TestEnv;
use lc_worker::scheduler::store::claim::{
    ClaimRequest, Claimed, claim_due, explain_analyze_claim, explain_claim,
};

#[tokio::test]
async fn the_claim_walks_each_pages_own_index_not_the_global_deadline_index() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let sql = env.sql().await;
    // The drain benchmark's shape: 16 unlimited pages, their rows interleaved, all due now
    // with the same deadline.
    let pages: Vec<String> = (1..=16).map(|i| format!("plan-page-{i}")).collect();
    sql.execute(
        "INSERT INTO page_state (page_id, rate_limit) SELECT unnest($1::text[]), 0",
        &[&pages],
    )
    .await
    .expect("pages");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT ($1::text[])[1 + (i % 16)], 'plan-' || i, now(), now() + interval '24 hours', now(), \
                'pending', now() \
         FROM generate_series(0, 99999) AS i",
        &[&pages],
    )
    .await
    .expect("opt-ins");
    sql.batch_execute("VACUUM ANALYZE optins")
        .await
        .expect("analyze");

    let mut client = pool.get().await.expect("client");
    let request = ClaimRequest {
        safety_margin: Duration::from_secs(60),
        ..ClaimRequest::new("plan-worker", Duration::from_secs(30), 64)
    };
    let plan = explain_claim(&mut client, &request).await.expect("explain");
    let text = plan.join("\n");
    assert!(
        text.contains("optins_pending_by_page"),
        "the per-page walk should use optins_pending_by_page:\n{text}"
    );
    assert!(
        !text.contains("optins_pending_by_deadline"),
        "the claim should not walk the global deadline index:\n{text}"
    );
}

/// A page with a backlog holds in-flight places for at most the look-ahead's worth of its
/// slots: with a look-ahead of 1 s, one page at 250/s took 231 of a replica's 256 places,
/// each waiting up to a second for its slot, and other pages' sends waited behind it.
#[tokio::test]
async fn one_pages_backlog_takes_only_the_lookaheads_worth_of_places() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let sql = env.sql().await;
    sql.execute(
        "INSERT INTO page_state (page_id, rate_limit) VALUES ('busy-page', 250)",
        &[],
    )
    .await
    .expect("page");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT 'busy-page', 'busy-' || i, now(), now() + interval '24 hours', now(), 'pending', now() \
         FROM generate_series(0, 999) AS i",
        &[],
    )
    .await
    .expect("opt-ins");
    let mut client = pool.get().await.expect("client");
    // What the scheduler asks for by default (`CLAIM_LOOKAHEAD_MS` unset), with all 256
    // places free.
    let config = <lc_worker::scheduler::SchedulerConfig as clap::Parser>::try_parse_from([
        "scheduler",
        "--pages-file",
        "pages.toml",
        "--amqp-url",
        "amqp://127.0.0.1",
        "--database-url",
        "postgres://127.0.0.1/x",
    ])
    .expect("default config");
    let request = ClaimRequest {
        lookahead: config.lookahead(),
        ..ClaimRequest::new("busy-worker", Duration::from_secs(30), 256)
    };
    let claimed = lc_worker::scheduler::store::claim::claim_due(&mut client, &request)
        .await
        .expect("claim");
    // 250 ms of slots 1.12 / 250 s apart, plus the first: 56.
    assert!(
        (1..=64).contains(&claimed.len()),
        "one page's backlog took {} of 256 places",
        claimed.len()
    );
}

/// Issue 18: 30 % of the backlog due on one paused page, the other pages' rows mostly not yet
/// due with a few new due ones at the latest deadlines. The table-wide share of due rows made
/// the planner walk every other page's whole backlog in deadline order (`Rows Removed by
/// Filter` ≈ the page's backlog, 0.6–1.4 s per claim at 1M pending); a page with few due rows
/// must read them through `optins_pending_due_by_page`, and only they may be read.
#[tokio::test]
async fn a_paused_pages_due_backlog_does_not_make_the_claim_walk_other_pages() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let sql = env.sql().await;
    let pages: Vec<String> = (0..16).map(|i| format!("paused-plan-{i}")).collect();
    sql.execute(
        "INSERT INTO page_state (page_id, rate_limit) SELECT unnest($1::text[]), 0",
        &[&pages],
    )
    .await
    .expect("pages");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT ($1::text[])[2 + (i % 15)], 'later-' || i, now() - (i % 1000) * interval '1 minute', \
                now() + interval '1 hour' + (i % 1000) * interval '1 minute', now(), 'pending', \
                now() + interval '10 minutes' + (i % 1000) * interval '1 minute' \
         FROM generate_series(0, 69999) AS i",
        &[&pages],
    )
    .await
    .expect("rows not yet due");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT $1::text, 'paused-' || i, now() - (i % 1000) * interval '1 minute', \
                now() + interval '1 hour' + (i % 1000) * interval '1 minute', now(), 'pending', \
                now() - interval '1 minute' \
         FROM generate_series(0, 29999) AS i",
        &[&pages[0]],
    )
    .await
    .expect("the paused page's due rows");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT ($1::text[])[2 + (i % 15)], 'new-' || i, now(), now() + interval '24 hours', now(), \
                'pending', now() - interval '1 second' \
         FROM generate_series(0, 149) AS i",
        &[&pages],
    )
    .await
    .expect("new due rows");
    sql.execute(
        "UPDATE page_state SET paused_reason = 'operator', paused_since = now() WHERE page_id = $1",
        &[&pages[0]],
    )
    .await
    .expect("pause");
    sql.batch_execute("VACUUM ANALYZE optins")
        .await
        .expect("analyze");

    let mut client = pool.get().await.expect("client");
    let request = ClaimRequest::new("plan-worker", Duration::from_secs(30), 100);
    let plan = explain_claim(&mut client, &request).await.expect("explain");
    let text = plan.join("\n");
    assert!(
        text.contains("Index Scan using optins_pending_due_by_page on optins d"),
        "a page with few due rows should read them through optins_pending_due_by_page:\n{text}"
    );
    let claimed = lc_worker::scheduler::store::claim::claim_due(&mut client, &request)
        .await
        .expect("claim");
    assert_eq!(
        claimed.len(),
        100,
        "the 100 earliest of the 150 new due rows"
    );
    assert!(
        claimed.iter().all(|c| c.login_id.starts_with("new-")),
        "only the other pages' due rows are claimed"
    );
}

/// The rows a claim's plan filtered out, summed over its steps (`Rows Removed by Filter`,
/// per loop).
fn rows_filtered_out(plan: &[String]) -> u64 {
    plan.iter()
        .filter_map(|line| line.split("Rows Removed by Filter: ").nth(1))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum()
}

/// Refreshes the table's statistics, runs a claim of 100 under `EXPLAIN ANALYZE` (rolled
/// back), then for real: the rows the plan filtered out, the plan, and the rows claimed.
async fn analyze_then_claim(
    pool: &deadpool_postgres::Pool,
    sql: &tokio_postgres::Client,
) -> (u64, String, Vec<Claimed>) {
    sql.batch_execute("VACUUM ANALYZE optins")
        .await
        .expect("analyze");
    let mut client = pool.get().await.expect("client");
    let request = ClaimRequest::new("plan-worker", Duration::from_secs(30), 100);
    let plan = explain_analyze_claim(&mut client, &request)
        .await
        .expect("explain");
    let claimed = claim_due(&mut client, &request).await.expect("claim");
    (rows_filtered_out(&plan), plan.join("\n"), claimed)
}

/// Issue 18: pages whose due rows sit behind many retries waiting out a back-off (the
/// retries have the earlier deadlines). The claim chose its arm by counting due rows: over
/// 256 it walked the page's deadline index and filtered out every retry in front of the due
/// rows, each claim (90 ms per claim with 5,000 retries per page). Now the arm depends on
/// whether due rows lead the page's deadline order, and the retries are not read.
#[tokio::test]
async fn due_rows_behind_retries_in_back_off_are_claimed_without_walking_the_retries() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let sql = env.sql().await;
    let pages: Vec<String> = (0..4).map(|i| format!("backoff-page-{i}")).collect();
    sql.execute(
        "INSERT INTO page_state (page_id, rate_limit) SELECT unnest($1::text[]), 250",
        &[&pages],
    )
    .await
    .expect("pages");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
             next_attempt_at, attempts) \
         SELECT ($1::text[])[1 + (i % 4)], 'retry-' || i, now() - interval '2 hours', \
                now() + interval '22 hours', now() - interval '2 hours', 'pending', \
                now() + interval '1 hour', 3 \
         FROM generate_series(0, 7999) AS i",
        &[&pages],
    )
    .await
    .expect("retries in back-off");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT ($1::text[])[1 + (i % 4)], 'due-' || i, now(), now() + interval '24 hours', now(), \
                'pending', now() - interval '1 second' \
         FROM generate_series(0, 1199) AS i",
        &[&pages],
    )
    .await
    .expect("due rows");

    let (filtered, plan, claimed) = analyze_then_claim(&pool, &sql).await;
    assert!(
        filtered < 1000,
        "the claim filtered out {filtered} rows (the retries are 8,000):\n{plan}"
    );
    assert_eq!(claimed.len(), 100, "100 of the 1,200 due rows");
    assert!(
        claimed.iter().all(|c| c.login_id.starts_with("due-")),
        "no retry before its back-off ends"
    );
}

/// Issue 18: the drain benchmark's shape once the table holds the sent rows of earlier
/// drains (16 pages, 188 due rows each, 50,000 sent). Counting due rows made every page
/// "sparse", and for that arm the planner walked the global `optins_pending_by_deadline` and
/// `optins_pending_by_next_attempt` indexes, filtering them by page: every page's due rows
/// read (and filtered out) for each page, 20–30 ms per claim. Due rows lead each page's
/// deadline order here, so the claim walks each page's own index as far as its budget.
#[tokio::test]
async fn a_drain_over_a_table_with_sent_rows_reads_only_each_pages_own_rows() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(2).await;
    let sql = env.sql().await;
    let pages: Vec<String> = (1..=16).map(|i| format!("drain-page-{i}")).collect();
    sql.execute(
        "INSERT INTO page_state (page_id, rate_limit) SELECT unnest($1::text[]), 250",
        &[&pages],
    )
    .await
    .expect("pages");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, \
             next_attempt_at, sent_at, message_id) \
         SELECT ($1::text[])[1 + (i % 16)], 'sent-' || i, now(), now() + interval '24 hours', \
                now(), 'sent', now(), now(), 'm-' || i \
         FROM generate_series(0, 49999) AS i",
        &[&pages],
    )
    .await
    .expect("sent rows");
    sql.execute(
        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
         SELECT ($1::text[])[1 + (i % 16)], 'drain-' || i, now(), now() + interval '24 hours', \
                now(), 'pending', now() \
         FROM generate_series(0, 2999) AS i",
        &[&pages],
    )
    .await
    .expect("due rows");

    let (filtered, plan, claimed) = analyze_then_claim(&pool, &sql).await;
    assert!(
        filtered < 1000,
        "the claim filtered out {filtered} rows (other pages' rows?):\n{plan}"
    );
    assert_eq!(claimed.len(), 100);
}
