//! The "call started" mark: a worker that dies between claiming an opt-in and calling Graph
//! leaves a safe retry (not an unknown outcome), only a marked claim follows
//! `UNKNOWN_OUTCOME`, a superseded claim makes no call, and two pages' opt-ins for one
//! login_id marked at the same moment let only one call go out; and the group commits of
//! marks and of sent records, which lock people's rows in the one lock order.

use std::time::Duration;

use lc_testkit::pipeline::{PAGE, TestEnv, claim, expire_leases, insert_optin, optin_state};
use lc_worker::scheduler::store;
use lc_worker::scheduler::store::call_start::CallCheck;
use lc_worker::scheduler::store::rescue::{Rescued, UnknownOutcome};
use time::OffsetDateTime;

/// A migrated pool on the test's database and a plain connection for assertions.
async fn store_env() -> (TestEnv, deadpool_postgres::Pool, tokio_postgres::Client) {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(4).await;
    let sql = env.sql().await;
    (env, pool, sql)
}

#[tokio::test]
async fn a_worker_killed_between_claim_and_call_leaves_the_optin_to_be_sent() {
    let (env, pool, sql) = store_env().await;
    insert_optin(&sql, PAGE, "K1", OffsetDateTime::now_utc(), "pending").await;
    // A worker claims the row and dies before calling (nothing of it runs on).
    let mut client = pool.get().await.expect("client");
    let claimed = claim(&mut client, "dead-worker", Duration::from_secs(1)).await;
    assert_eq!(claimed.len(), 1);
    drop(client);

    let events = env.capture_events(&["first_message.*.#"]).await;
    // The default policy: a call in flight at the crash would end the opt-in failed.
    let mut config = env.scheduler_config();
    config.unknown_outcome = UnknownOutcome::Fail;
    let (scheduler, stop) = env.start_scheduler(config).await;
    let got = env.events(&events, 1).await;
    stop.trigger();
    scheduler.task.await.expect("stopped");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["type"], "com.loginconnect.first_message.sent");
    assert_eq!(
        env.graph.send_calls().len(),
        1,
        "exactly one call, by the rescuer's retry"
    );
    assert_eq!(optin_state(&sql, "K1").await.as_deref(), Some("sent"));
}

#[tokio::test]
async fn only_a_claim_marked_as_called_follows_the_unknown_outcome_policy() {
    let (_env, pool, sql) = store_env().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, PAGE, "M1", now, "pending").await;
    insert_optin(&sql, PAGE, "M2", now, "pending").await;
    let mut client = pool.get().await.expect("client");
    let lease = Duration::from_secs(30);
    let claimed = claim(&mut client, "worker-a", lease).await;
    assert_eq!(claimed.len(), 2);
    // The call of M1 started; M2's never did.
    let m1 = claimed.iter().find(|c| c.login_id == "M1").expect("M1");
    assert_eq!(
        store::call_start::begin_call(&mut client, m1)
            .await
            .expect("mark"),
        CallCheck::Go
    );
    expire_leases(&sql).await;
    let rescued = store::rescue::rescue_expired_leases(&mut client, UnknownOutcome::Fail, 10)
        .await
        .expect("rescue");
    assert_eq!(
        rescued,
        Rescued {
            returned: 1,
            unknown: 1
        }
    );
    let row = sql
        .query_one(
            "SELECT state, failure_reason FROM optins WHERE login_id = 'M1'",
            &[],
        )
        .await
        .expect("M1");
    assert_eq!(row.get::<_, String>(0), "failed");
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("outcome_unknown")
    );
    assert_eq!(optin_state(&sql, "M2").await.as_deref(), Some("pending"));
    let events: Vec<String> = sql
        .query("SELECT event_type FROM outbox ORDER BY id", &[])
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(events, ["first_message.failed"]);

    // Under `retry`, a marked row goes back to pending, and its next claim starts unmarked
    // (else a crash before that claim's call would count as an unknown outcome again).
    sql.execute("DELETE FROM optins", &[]).await.expect("clear");
    insert_optin(&sql, PAGE, "M3", now, "pending").await;
    let claimed = claim(&mut client, "worker-b", lease).await;
    assert_eq!(
        store::call_start::begin_call(&mut client, &claimed[0])
            .await
            .expect("mark"),
        CallCheck::Go
    );
    expire_leases(&sql).await;
    let rescued = store::rescue::rescue_expired_leases(&mut client, UnknownOutcome::Retry, 10)
        .await
        .expect("rescue");
    assert_eq!(
        rescued,
        Rescued {
            returned: 0,
            unknown: 1
        }
    );
    let again = claim(&mut client, "worker-c", lease).await;
    assert_eq!(again.len(), 1);
    let marked: Option<OffsetDateTime> = sql
        .query_one(
            "SELECT call_started_at FROM optins WHERE login_id = 'M3'",
            &[],
        )
        .await
        .expect("M3")
        .get(0);
    assert_eq!(marked, None);
}

#[tokio::test]
async fn a_superseded_claim_is_not_marked_and_makes_no_call() {
    let (_env, pool, sql) = store_env().await;
    insert_optin(&sql, PAGE, "S1", OffsetDateTime::now_utc(), "pending").await;
    let mut client = pool.get().await.expect("client");
    let lease = Duration::from_secs(30);
    let old = claim(&mut client, "worker-a", lease).await;
    expire_leases(&sql).await;
    store::rescue::rescue_expired_leases(&mut client, UnknownOutcome::Fail, 10)
        .await
        .expect("rescue");
    let new = claim(&mut client, "worker-b", lease).await;
    assert_eq!(
        store::call_start::begin_call(&mut client, &old[0])
            .await
            .expect("old"),
        CallCheck::Lost
    );
    assert_eq!(
        store::call_start::begin_call(&mut client, &new[0])
            .await
            .expect("new"),
        CallCheck::Go
    );
}

#[tokio::test]
async fn two_pages_marking_one_login_id_at_once_let_only_one_call_go_out() {
    let (_env, pool, sql) = store_env().await;
    let now = OffsetDateTime::now_utc();
    // Rounds, so that both orders of the two transactions are likely to occur.
    for round in 0..20 {
        let login_id = format!("P{round}");
        insert_optin(&sql, "111", &login_id, now, "pending").await;
        insert_optin(&sql, "222", &login_id, now, "pending").await;
        let (mut a, mut b) = (
            pool.get().await.expect("client a"),
            pool.get().await.expect("client b"),
        );
        let claimed = claim(&mut a, "worker", Duration::from_secs(30)).await;
        assert_eq!(claimed.len(), 2);
        let (first, second) = tokio::join!(
            store::call_start::begin_call(&mut a, &claimed[0]),
            store::call_start::begin_call(&mut b, &claimed[1])
        );
        let checks = [first.expect("first"), second.expect("second")];
        let go: Vec<usize> = (0..2).filter(|&k| checks[k] == CallCheck::Go).collect();
        assert_eq!(
            go.len(),
            1,
            "round {round}: exactly one call may go out: {checks:?}"
        );
        let winner = &claimed[go[0]].page_id;
        let loser = 1 - go[0];
        assert_eq!(
            checks[loser],
            CallCheck::OtherPage(winner.clone()),
            "round {round}"
        );
        // Both rows stay claimed; end them so the next round claims only its own.
        sql.execute(
            "UPDATE optins SET state = 'failed', failure_reason = 'test' WHERE login_id = $1",
            &[&login_id],
        )
        .await
        .expect("end round");
    }
}

#[tokio::test]
async fn claims_of_one_login_id_in_one_group_commit_see_each_other() {
    let (_env, pool, sql) = store_env().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, "111", "G1", now, "pending").await;
    insert_optin(&sql, "222", "G1", now, "pending").await;
    insert_optin(&sql, PAGE, "G2", now, "pending").await;
    let mut client = pool.get().await.expect("client");
    let claimed = claim(&mut client, "worker", Duration::from_secs(30)).await;
    assert_eq!(claimed.len(), 3);
    let checks = store::call_start::begin_calls(&mut client, &claimed)
        .await
        .expect("group");
    let of = |login_id: &str| -> Vec<&CallCheck> {
        claimed
            .iter()
            .zip(&checks)
            .filter(|(c, _)| c.login_id == login_id)
            .map(|(_, check)| check)
            .collect()
    };
    assert_eq!(of("G2"), [&CallCheck::Go]);
    let g1 = of("G1");
    assert_eq!(
        g1.iter().filter(|c| ***c == CallCheck::Go).count(),
        1,
        "{g1:?}"
    );
    assert!(
        g1.iter().any(|c| matches!(c, CallCheck::OtherPage(_))),
        "{g1:?}"
    );
}

#[tokio::test]
async fn a_group_of_sent_records_writes_each_current_claim_and_skips_a_stale_one() {
    let (_env, pool, sql) = store_env().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, PAGE, "R1", now, "pending").await;
    insert_optin(&sql, PAGE, "R2", now, "pending").await;
    let mut client = pool.get().await.expect("client");
    let claimed = claim(&mut client, "worker", Duration::from_secs(30)).await;
    assert_eq!(claimed.len(), 2);
    let mut stale = claimed[1].clone();
    stale.fence -= 1;
    let records = [
        store::finish::Finish::Sent(store::finish::SentRecord {
            claim: claimed[0].clone(),
            message_id: "m_1".into(),
            sent_at: now,
        }),
        store::finish::Finish::Sent(store::finish::SentRecord {
            claim: stale,
            message_id: "m_stale".into(),
            sent_at: now,
        }),
    ];
    let written = store::finish::finish_group(&mut client, &records)
        .await
        .expect("group");
    assert_eq!(written, [true, false]);
    let sent_login = &claimed[0].login_id;
    let other_login = &claimed[1].login_id;
    assert_eq!(optin_state(&sql, sent_login).await.as_deref(), Some("sent"));
    assert_eq!(
        optin_state(&sql, other_login).await.as_deref(),
        Some("sending")
    );
    let events: i64 = sql
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .expect("outbox")
        .get(0);
    assert_eq!(events, 1, "one event, for the written record only");
}

/// Every ending of a group — sent, failed, expired, replied, and a stale claim — is written in
/// one transaction with its own event; a failure without an error of its own announces the
/// row's last retry error.
#[tokio::test]
async fn a_group_of_mixed_endings_writes_each_with_its_own_event() {
    use store::finish::{Ending, Finish, SentRecord};
    let (_env, pool, sql) = store_env().await;
    let now = OffsetDateTime::now_utc();
    for login in ["E1", "E2", "E3", "E4", "E5"] {
        insert_optin(&sql, PAGE, login, now, "pending").await;
    }
    sql.execute(
        "UPDATE optins SET last_error_code = 2, last_error_message = 'earlier' WHERE login_id = 'E2'",
        &[],
    )
    .await
    .expect("earlier error");
    let mut client = pool.get().await.expect("client");
    let claimed = claim(&mut client, "worker", Duration::from_secs(30)).await;
    assert_eq!(claimed.len(), 5);
    let by_login = |login: &str| {
        claimed
            .iter()
            .find(|c| c.login_id == login)
            .cloned()
            .expect("claimed")
    };
    let mut stale = by_login("E5");
    stale.fence -= 1;
    let error = store::StoredError {
        code: Some(551),
        message: "unavailable".into(),
        ..store::StoredError::default()
    };
    let finishes = [
        Finish::Sent(SentRecord {
            claim: by_login("E1"),
            message_id: "m_1".into(),
            sent_at: now,
        }),
        Finish::Unsent {
            claim: by_login("E2"),
            ending: Ending::Failed(lc_shared::optin::FailureReason::OtherPage),
            called: false,
            error: None,
        },
        Finish::Unsent {
            claim: by_login("E3"),
            ending: Ending::Expired,
            called: true,
            error: Some(error),
        },
        Finish::Replied {
            claim: by_login("E4"),
            replied_at: now,
        },
        Finish::Unsent {
            claim: stale,
            ending: Ending::Expired,
            called: true,
            error: None,
        },
    ];
    let written = store::finish::finish_group(&mut client, &finishes)
        .await
        .expect("group");
    assert_eq!(written, [true, true, true, true, false]);
    for (login, state) in [
        ("E1", "sent"),
        ("E2", "failed"),
        ("E3", "expired"),
        ("E4", "replied"),
        ("E5", "sending"),
    ] {
        assert_eq!(
            optin_state(&sql, login).await.as_deref(),
            Some(state),
            "{login}"
        );
    }
    let rows = sql
        .query(
            "SELECT event_type, cloudevent->'data' FROM outbox ORDER BY id",
            &[],
        )
        .await
        .expect("outbox");
    let events: Vec<(String, serde_json::Value)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "first_message.sent",
            "first_message.failed",
            "first_message.expired"
        ],
        "one event per written ending, in the group's order; none for the reply or the stale claim"
    );
    assert_eq!(
        events[1].1["last_error"]["message"], "earlier",
        "{:?}",
        events[1].1
    );
    assert_eq!(events[1].1["attempts"], 0);
    assert_eq!(events[2].1["last_error"]["code"], 551, "{:?}", events[2].1);
    assert_eq!(events[2].1["attempts"], 1);
}

/// Asserts, from `hold` (the transaction holding A1), that nobody holds B1 — `who` waits
/// for A1 without having locked B1 first — then rolls `hold` back to let the waiters go.
async fn assert_b1_free_then_release(hold: deadpool_postgres::Transaction<'_>, who: &str) {
    let b_free = hold
        .execute(
            "SELECT 1 FROM optins WHERE login_id = 'B1' FOR UPDATE NOWAIT",
            &[],
        )
        .await;
    assert!(
        b_free.is_ok(),
        "{who} locked B1 before A1: {:?}",
        b_free.err()
    );
    hold.rollback().await.expect("release");
}

/// A group of endings locks people's rows in the one lock order (`runtime::lock_order`), not
/// in the order its endings were submitted. Found by the process benchmark: a group that
/// locked B then A while the correlator's batch (which locks in that order) held A and
/// wanted B deadlocked, and PostgreSQL broke it only after a second, stalling both. Here
/// another transaction holds A while the group [B, A] runs: the group must be waiting for A
/// without having locked B.
#[tokio::test]
async fn a_group_of_endings_locks_rows_in_lock_order_whatever_its_submission_order() {
    use store::finish::{Finish, SentRecord};
    let (_env, pool, sql) = store_env().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, PAGE, "A1", now, "pending").await;
    insert_optin(&sql, PAGE, "B1", now, "pending").await;
    let mut client = pool.get().await.expect("client");
    let claimed = claim(&mut client, "worker", Duration::from_secs(30)).await;
    let of = |login_id: &str| {
        claimed
            .iter()
            .find(|c| c.login_id == login_id)
            .expect("claimed")
            .clone()
    };
    let sent = |login_id: &str| {
        Finish::Sent(SentRecord {
            claim: of(login_id),
            message_id: format!("m_{login_id}"),
            sent_at: now,
        })
    };
    let records = vec![sent("B1"), sent("A1")];

    let mut holder = pool.get().await.expect("holder");
    let hold = holder.transaction().await.expect("transaction");
    hold.execute("SELECT 1 FROM optins WHERE login_id = 'A1' FOR UPDATE", &[])
        .await
        .expect("lock A1");
    let group = tokio::spawn(async move {
        store::finish::finish_group(&mut client, &records)
            .await
            .expect("group")
    });
    lc_testkit::pipeline::eventually(
        lc_testkit::pipeline::WAIT,
        "the group waits for A1",
        || async {
            sql.query_one(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .expect("activity")
            .get::<_, i64>(0)
                == 1
        },
    )
    .await;
    assert_b1_free_then_release(hold, "the group").await;
    assert_eq!(group.await.expect("group task"), [true, true]);
    assert_eq!(optin_state(&sql, "A1").await.as_deref(), Some("sent"));
    assert_eq!(optin_state(&sql, "B1").await.as_deref(), Some("sent"));
}

/// The scheduler's group of endings and the correlator's batch of replies lock people's rows
/// in the same order (`runtime::lock_order`: login_id, then page), across pages too. The
/// process benchmark found them deadlocking while the correlator still locked by (page,
/// login_id): it held one person's row and wanted another's that a group held, and
/// PostgreSQL broke it only after `deadlock_timeout` (1 s), stalling both. Here A1 (on the
/// page that sorts second) is held by another transaction while the group [B1, A1] and then
/// one correlator batch of replies to B1 and A1 wait for it: neither may have locked B1.
/// That no deadlock happened is checked by its outcomes: it fails one side, the group (an
/// error here) or the correlator's batch (counted in `batch_failures` before its retry).
/// Queued replies alone do not make one batch (the consumer takes what has arrived, and took
/// B1 alone once in five runs), hence the gate below.
#[tokio::test]
async fn endings_and_a_batch_of_replies_across_pages_lock_rows_in_one_order() {
    use lc_shared::topology::CORRELATOR_QUEUE;
    use lc_testkit::pipeline::{WAIT, body, count, eventually, post_signed, text_reply_item};
    use store::finish::{Finish, SentRecord};
    const SECOND_PAGE: &str = "2222222222";
    /// Posts a reply to `login_id`'s first message on `page`.
    async fn reply(p: &lc_testkit::pipeline::Pipeline, page: &str, login_id: &str) {
        let now = OffsetDateTime::now_utc();
        let reply = text_reply_item(page, &format!("P_{login_id}"), login_id, login_id, now);
        assert_eq!(post_signed(&p.ingest, body(page, vec![reply])).await, 200);
    }
    assert!(SECOND_PAGE > PAGE, "A1's page sorts after B1's");
    let env = TestEnv::new().await;
    let mut p = env.pipeline().start().await;
    let pool = env.migrated_pool(4).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, SECOND_PAGE, "A1", now, "pending").await;
    insert_optin(&sql, PAGE, "B1", now, "pending").await;
    let mut client = pool.get().await.expect("client");
    let claimed = claim(&mut client, "worker", Duration::from_secs(30)).await;
    let sent = |login_id: &str| {
        let claim = claimed.iter().find(|c| c.login_id == login_id);
        Finish::Sent(SentRecord {
            claim: claim.expect("claimed").clone(),
            message_id: format!("m_{login_id}"),
            sent_at: now,
        })
    };
    let records = vec![sent("B1"), sent("A1")];
    let waiting = |n: i64| {
        let sql = &sql;
        move || async move {
            let query = "SELECT count(*) FROM pg_stat_activity \
                         WHERE datname = current_database() AND wait_event_type = 'Lock'";
            count(sql, query).await == n
        }
    };
    // A gate: the correlator's first batch, the reply to G0, waits for G0's row, so that the
    // replies to B1 and A1 pile up behind it and are taken as one batch.
    insert_optin(&sql, PAGE, "G0", now, "pending").await;
    let (mut gate, mut holder) = (
        pool.get().await.expect("gate"),
        pool.get().await.expect("holder"),
    );
    let (gate, hold) = (
        gate.transaction().await.expect("gate tx"),
        holder.transaction().await.expect("holder tx"),
    );
    gate.execute("SELECT 1 FROM optins WHERE login_id = 'G0' FOR UPDATE", &[])
        .await
        .expect("lock G0");
    hold.execute("SELECT 1 FROM optins WHERE login_id = 'A1' FOR UPDATE", &[])
        .await
        .expect("lock A1");
    reply(&p, PAGE, "G0").await;
    p.start_correlator(&env).await;
    eventually(WAIT, "the correlator waits for G0", waiting(1)).await;
    let group = tokio::spawn(async move {
        store::finish::finish_group(&mut client, &records)
            .await
            .expect("group")
    });
    eventually(WAIT, "the group waits for A1", waiting(2)).await;
    reply(&p, PAGE, "B1").await;
    reply(&p, SECOND_PAGE, "A1").await;
    eventually(WAIT, "both replies delivered to the correlator", || async {
        env.depth(CORRELATOR_QUEUE).await == 0
    })
    .await;
    gate.rollback().await.expect("open the gate");
    eventually(WAIT, "G0 linked", || async { p.replies("linked") == 1 }).await;
    eventually(WAIT, "the batch of B1 and A1 waits for A1", waiting(2)).await;
    assert_eq!(
        count(&sql, "SELECT count(*) FROM links").await,
        1,
        "B1 and A1 in one batch"
    );
    assert_b1_free_then_release(hold, "the group or the correlator's batch").await;

    assert_eq!(group.await.expect("group task"), [true, true]);
    p.wait_processed(3).await;
    assert_eq!(p.replies("linked"), 3);
    assert_eq!(
        p.correlator().metrics.batch_failures.get(),
        0,
        "the correlator's batch never failed (no deadlock)"
    );
    let sent_and_replied = "SELECT count(*) FROM optins \
                            WHERE state = 'sent' AND replied_at IS NOT NULL";
    assert_eq!(count(&sql, sent_and_replied).await, 2);
    let links = format!(
        "SELECT count(*) FROM links WHERE (page_id, login_id) \
         IN (('{PAGE}', 'B1'), ('{SECOND_PAGE}', 'A1'))"
    );
    assert_eq!(count(&sql, &links).await, 2);
    p.stop().await;
}
