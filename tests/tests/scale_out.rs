//! The scheduler's invariants with several replicas and several pages (DESIGN invariants
//! 13–15): a page's rate holds whoever calls and without a burst after an idle time, a page
//! with budget is never kept waiting by another page's backlog, a pause and its recovery
//! reach every replica, and a slow call on a live worker is never mistaken for a dead one.

use std::time::Duration;

use clap::Parser;
use lc_shared::shutdown::Shutdown;
use lc_testkit::fake_graph::RecordedCall;
use lc_testkit::pipeline::{FIRST_TEXT, PAGE, PAGE_TOKEN, TestEnv, insert_optin};
use lc_worker::scheduler::store::rescue::UnknownOutcome;
use lc_worker::scheduler::{RunningScheduler, SchedulerConfig};
use time::OffsetDateTime;

/// A second page, for fairness.
const PAGE_B: &str = "2234567890";
const TOKEN_B: &str = "EAAG-test-page-b";
/// A token-encryption key list for the schedulers and the CLI.
const KEYS: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Writes a pages file with [`PAGE`] (with `token`) and [`PAGE_B`].
fn write_two_pages(env: &TestEnv, token: &str) {
    let text = format!(
        "[[pages]]\nid = \"{PAGE}\"\naccess_token = \"{token}\"\n[pages.first_message]\ntext = \"{FIRST_TEXT}\"\n\n\
         [[pages]]\nid = \"{PAGE_B}\"\naccess_token = \"{TOKEN_B}\"\n[pages.first_message]\ntext = \"{FIRST_TEXT}\"\n"
    );
    std::fs::write(&env.pages_file, text).expect("pages file");
    env.graph.add_page(PAGE_B, TOKEN_B);
}

async fn replicas(
    env: &TestEnv,
    n: usize,
    config: &SchedulerConfig,
) -> Vec<(RunningScheduler, Shutdown)> {
    let mut all = Vec::new();
    for _ in 0..n {
        all.push(env.start_scheduler(config.clone()).await);
    }
    all
}

async fn stop(all: Vec<(RunningScheduler, Shutdown)>) {
    for (s, stop) in all {
        stop.trigger();
        s.task.await.expect("scheduler stopped");
    }
}

/// The most calls of `page` that arrived within any one-second window.
fn busiest_second(calls: &[RecordedCall], page: &str) -> usize {
    let times: Vec<OffsetDateTime> = calls
        .iter()
        .filter(|c| c.page_id == page)
        .map(|c| c.at)
        .collect();
    (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t - times[i] < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until `n` opt-ins are `sent` (polling the table: the outcome of many calls).
async fn wait_sent(env: &TestEnv, n: i64, within: Duration) {
    let sql = env.sql().await;
    let started = std::time::Instant::now();
    loop {
        let sent: i64 = sql
            .query_one("SELECT count(*) FROM optins WHERE state = 'sent'", &[])
            .await
            .expect("count")
            .get(0);
        if sent == n {
            return;
        }
        assert!(started.elapsed() < within, "only {sent} of {n} sent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn backlog(env: &TestEnv, page: &str, prefix: &str, n: usize) {
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    for i in 0..n {
        insert_optin(&sql, page, &format!("{prefix}{i}"), now, "pending").await;
    }
}

#[tokio::test]
async fn the_page_rate_holds_across_two_replicas_without_a_burst_after_idle() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    env.graph.set_latency(Duration::from_millis(20));
    let mut config = env.scheduler_config();
    config.page_rate_limit = 20;
    // A backlog waiting while nothing ran: the page has been idle.
    backlog(&env, PAGE, "R", 100).await;
    let all = replicas(&env, 2, &config).await;
    let calls = env
        .graph
        .wait_for_send_calls(100, Duration::from_secs(30))
        .await
        .expect("every opt-in called");
    stop(all).await;
    let peak = busiest_second(&calls, PAGE);
    assert!(
        peak <= 20,
        "{peak} calls for one page in one second with PAGE_RATE_LIMIT=20 on two replicas"
    );
}

#[tokio::test]
async fn a_page_with_budget_is_not_kept_waiting_by_another_pages_backlog() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    write_two_pages(&env, PAGE_TOKEN);
    let mut config = env.scheduler_config();
    config.page_rate_limit = 5;
    config.max_in_flight = 20;
    backlog(&env, PAGE, "A", 300).await;
    let all = replicas(&env, 1, &config).await;
    env.graph
        .wait_for_send_calls(1, Duration::from_secs(10))
        .await
        .expect("page A is being sent");
    backlog(&env, PAGE_B, "B", 10).await;
    // Page B's ten need two seconds at 5/s; page A's backlog needs a minute.
    let started = std::time::Instant::now();
    let b_done = loop {
        let b = env
            .graph
            .send_calls()
            .iter()
            .filter(|c| c.page_id == PAGE_B)
            .count();
        if b >= 10 || started.elapsed() > Duration::from_secs(15) {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let a_calls = env
        .graph
        .send_calls()
        .iter()
        .filter(|c| c.page_id == PAGE)
        .count();
    stop(all).await;
    assert_eq!(b_done, 10, "page B waited behind page A's backlog");
    assert!(a_calls < 300, "page A still had a backlog ({a_calls} sent)");
}

#[tokio::test]
async fn a_token_pause_holds_on_every_replica_and_a_stored_token_resumes_them_all() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    // Graph knows only the new token: every call with the configured one gets code 190.
    let new_token = "EAAG-rotated-page-token";
    env.graph.set_token(PAGE, new_token);
    let mut config = env.scheduler_config();
    config.page_token_keys = KEYS.into();
    backlog(&env, PAGE, "T", 30).await;
    let all = replicas(&env, 2, &config).await;
    env.graph
        .wait_for_send_calls(1, Duration::from_secs(10))
        .await
        .expect("a first call");
    // A refresh of every replica's view of the pauses (500 ms), twice over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let paused_at = env.graph.send_calls().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.graph.send_calls().len(),
        paused_at,
        "a replica kept calling a page another replica paused"
    );
    assert!(paused_at < 30, "{paused_at} calls before the pause held");

    // The documented recovery for a token given by variable: store the new one.
    let db = env.db.url();
    let token_file = env.pages_file.with_extension("token");
    std::fs::write(&token_file, new_token).expect("token file");
    let argv = [
        "loginconnect",
        "--database-url",
        &db,
        "pages",
        "set-token",
        PAGE,
        "--from-file",
        token_file.to_str().expect("utf-8 path"),
        "--page-token-keys",
        KEYS,
    ];
    let cli = lc_worker::cli::Cli::try_parse_from(argv).expect("arguments");
    let mut out = Vec::new();
    lc_worker::cli::run(cli, &mut out).await.expect("set-token");
    let _ = std::fs::remove_file(&token_file);

    wait_sent(&env, 30, Duration::from_secs(30)).await;
    stop(all).await;
    let ok = env
        .graph
        .send_calls()
        .iter()
        .filter(|c| c.outcome == "ok")
        .count();
    assert_eq!(ok, 30, "one message per opt-in");
}

#[tokio::test]
async fn a_slow_call_on_a_live_worker_is_never_rescued_into_a_second_message() {
    let env = TestEnv::new().await;
    env.migrated_pool(2).await;
    // Scaled down from the 12 s lease / 10 s timeout / 8 s Graph: the same ratios.
    env.graph.set_latency(Duration::from_millis(1500));
    let mut config = env.scheduler_config();
    config.lease_secs = 3;
    config.graph_timeout_ms = 2500;
    config.page_rate_limit = 1;
    config.unknown_outcome = UnknownOutcome::Retry;
    backlog(&env, PAGE, "S", 6).await;
    let all = replicas(&env, 2, &config).await;
    wait_sent(&env, 6, Duration::from_secs(40)).await;
    stop(all).await;
    let calls = env.graph.send_calls();
    let mut per_login: std::collections::HashMap<String, usize> = Default::default();
    for c in &calls {
        *per_login
            .entry(c.login_id.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let twice: Vec<_> = per_login.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "people messaged twice without any crash: {twice:?}"
    );
    assert_eq!(calls.len(), 6);
}
