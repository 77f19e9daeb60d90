//! Never a second first message, never a deleted person back (issue 14 items 8 and 9): a
//! linked person gets no first message however old the link; a sent opt-in pruned after
//! `OPTIN_RETENTION_DAYS` leaves a permanent record, so a later login event opens no window;
//! after a data deletion, a redelivered opt-in or reply does not recreate the person,
//! unpublished events about them are gone, and the receipt counts what matched.

use std::time::Duration;

use lc_meta::login::deletion::{DeletionIdentity, DeletionRequest};
use lc_shared::events::{IdentityLinked, PublicEvent, insert_outbox};
use lc_testkit::login::{login_args, login_event_body, login_id_for, post_login_event, sign_now};
use lc_testkit::pipeline::{
    PAGE, TestEnv, WAIT, body, claim, count, eventually, insert_optin, metrics_text, optin_item,
    optin_state, post_signed, text_reply_item,
};
use lc_worker::deletion::apply;
use lc_worker::scheduler::store::call_start::{CallCheck, begin_call};
use lc_worker::scheduler::store::rescue::prune_finished;
use time::OffsetDateTime;

/// The sum of `scheduler_optins_recorded_total` over every result: opt-ins the intake has
/// committed, whatever it made of them.
async fn optins_recorded(metrics_addr: std::net::SocketAddr) -> u64 {
    metrics_text(metrics_addr)
        .await
        .lines()
        .filter(|l| l.starts_with("scheduler_optins_recorded_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_person_linked_long_ago_gets_no_first_message_from_a_new_optin() {
    let env = TestEnv::new().await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    // Linked two days ago (mid-conversation since); the opt-in is new.
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, 'R8', 'PSID8', $2)",
        &[&PAGE, &(now - Duration::from_secs(2 * 86_400))],
    )
    .await
    .expect("link");
    assert_eq!(
        post_signed(&p.ingest, body(PAGE, vec![optin_item(PAGE, "R8", now)])).await,
        200
    );
    let addr = p.scheduler().metrics_addr;
    eventually(WAIT, "the opt-in recorded", || async {
        optins_recorded(addr).await >= 1
    })
    .await;
    assert_eq!(optin_state(&sql, "R8").await.as_deref(), Some("replied"));
    assert!(env.graph.send_calls().is_empty(), "nothing sent");
    p.stop_scheduler().await;
}

#[tokio::test]
async fn a_link_made_while_the_optin_is_claimed_stops_the_call_however_old_the_reply() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    let sql = env.sql().await;
    let now = OffsetDateTime::now_utc();
    insert_optin(&sql, PAGE, "R9", now, "pending").await;
    let mut client = pool.get().await.expect("client");
    let claimed = claim(&mut client, "worker", Duration::from_secs(30)).await;
    assert_eq!(claimed.len(), 1);
    // Meta redelivers, hours late, a reply of two days ago: the link appears while the
    // opt-in is claimed (the correlator only turns a `pending` opt-in into `replied`).
    let replied_at = now - Duration::from_secs(2 * 86_400);
    sql.execute(
        "INSERT INTO links (page_id, login_id, psid, linked_at) VALUES ($1, 'R9', 'PSID9', $2)",
        &[&PAGE, &replied_at],
    )
    .await
    .expect("link");
    let check = begin_call(&mut client, &claimed[0]).await.expect("check");
    assert!(
        matches!(check, CallCheck::Replied(_)),
        "no call to a linked person: {check:?}"
    );
}

#[tokio::test]
async fn a_login_event_after_the_sent_optin_was_pruned_opens_no_new_window() {
    let env = TestEnv::new().await;
    let p = env
        .pipeline()
        .login(login_args(None))
        .scheduler(env.scheduler_config())
        .start()
        .await;
    let sql = env.sql().await;
    let asid = "5558001";
    let login_id = login_id_for(asid, PAGE);
    let post_login = |at: OffsetDateTime| {
        let ingest = &p.ingest;
        async move {
            let body = login_event_body(asid, PAGE, at);
            let (status, json) = post_login_event(ingest, &body, Some(&sign_now(&body))).await;
            assert_eq!(status, 200, "{json}");
        }
    };
    post_login(OffsetDateTime::now_utc()).await;
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("the first message");
    eventually(WAIT, "sent", || async {
        optin_state(&sql, &login_id).await.as_deref() == Some("sent")
    })
    .await;
    // OPTIN_RETENTION_DAYS later the finished row is pruned.
    sql.execute(
        "UPDATE optins SET finished_at = now() - interval '100 days'",
        &[],
    )
    .await
    .expect("age");
    let pool = env.migrated_pool(1).await;
    let mut client = pool.get().await.expect("client");
    let tx = client.transaction().await.expect("tx");
    let pruned = prune_finished(&tx, Duration::from_secs(30 * 86_400), 100)
        .await
        .expect("prune");
    tx.commit().await.expect("commit");
    assert_eq!(pruned, 1);
    assert_eq!(count(&sql, "SELECT count(*) FROM optins").await, 0);

    // The person logs in again: the backend reports it, as it reports every login.
    let addr = p.scheduler().metrics_addr;
    let before = optins_recorded(addr).await;
    post_login(OffsetDateTime::now_utc()).await;
    eventually(WAIT, "the second opt-in recorded", || async {
        optins_recorded(addr).await > before
    })
    .await;
    assert_eq!(
        count(&sql, "SELECT count(*) FROM optins").await,
        0,
        "no new window"
    );
    let text = metrics_text(addr).await;
    assert!(
        text.contains("scheduler_optins_recorded_total{result=\"duplicate\"} 1"),
        "{text}"
    );
    assert_eq!(env.graph.send_calls().len(), 1, "one first message only");
}

#[tokio::test]
async fn after_a_deletion_a_redelivered_optin_or_reply_does_not_recreate_the_person() {
    let env = TestEnv::new().await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;
    p.start_correlator(&env).await;
    let sql = env.sql().await;
    let opted_in_at = OffsetDateTime::now_utc() - Duration::from_secs(600);
    let replied_at = opted_in_at + Duration::from_secs(60);
    let optin = body(PAGE, vec![optin_item(PAGE, "D9", opted_in_at)]);
    let reply = body(
        PAGE,
        vec![text_reply_item(PAGE, "PSID9", "m_9", "D9", replied_at)],
    );
    assert_eq!(post_signed(&p.ingest, optin.clone()).await, 200);
    env.graph
        .wait_for_send_calls(1, WAIT)
        .await
        .expect("the first message");
    assert_eq!(post_signed(&p.ingest, reply.clone()).await, 200);
    p.wait_processed(1).await;
    assert_eq!(p.replies("linked"), 1);

    let request = DeletionRequest {
        confirmation_code: "c".repeat(48),
        requested_at: OffsetDateTime::now_utc(),
        identities: vec![DeletionIdentity {
            page_id: PAGE.to_owned(),
            login_id: "D9".to_owned(),
        }],
    };
    let pool = env.migrated_pool(1).await;
    let mut client = pool.get().await.expect("client");
    apply(&mut client, &request).await.expect("deletion");
    drop(client);
    assert_eq!(count(&sql, "SELECT count(*) FROM links").await, 0);

    // Meta redelivers both (same bodies, same times).
    let addr = p.scheduler().metrics_addr;
    let before = optins_recorded(addr).await;
    assert_eq!(post_signed(&p.ingest, optin).await, 200);
    assert_eq!(post_signed(&p.ingest, reply).await, 200);
    p.wait_processed(2).await;
    eventually(WAIT, "the redelivered opt-in recorded", || async {
        optins_recorded(addr).await > before
    })
    .await;
    assert_eq!(optin_state(&sql, "D9").await, None, "no opt-in recreated");
    assert_eq!(
        count(&sql, "SELECT count(*) FROM links").await,
        0,
        "no link"
    );
    assert_eq!(p.replies("deleted"), 1);
    assert_eq!(env.graph.send_calls().len(), 1, "no second message");
    p.stop().await;
}

#[tokio::test]
async fn a_deletion_removes_unpublished_events_and_the_receipt_counts_what_matched() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(1).await;
    let sql = env.sql().await;
    let asid = "5559001";
    let (person, other) = (login_id_for(asid, PAGE), login_id_for("5559002", PAGE));
    let linked = |login_id: &str| {
        PublicEvent::IdentityLinked(IdentityLinked {
            page_id: PAGE.to_owned(),
            login_id: login_id.to_owned(),
            psid: "PSID".to_owned(),
            linked_at: OffsetDateTime::now_utc(),
            opted_in_at: None,
            first_reply_mid: None,
        })
    };
    // No relay runs: both events stay unpublished.
    for login_id in [&person, &other] {
        insert_outbox(&sql, &linked(login_id), "/test", None)
            .await
            .expect("outbox");
    }
    sql.execute(
        "INSERT INTO link_conflicts (page_id, login_id, linked_psid, conflicting_psid) \
         VALUES ($1, $2, 'PSID', 'PSID_OTHER')",
        &[&PAGE, &person],
    )
    .await
    .expect("conflict");
    let request = |code: char| DeletionRequest {
        confirmation_code: code.to_string().repeat(48),
        requested_at: OffsetDateTime::now_utc(),
        identities: vec![
            DeletionIdentity {
                page_id: PAGE.to_owned(),
                login_id: person.clone(),
            },
            DeletionIdentity {
                page_id: "9876543210".to_owned(),
                login_id: login_id_for(asid, "9876543210"),
            },
        ],
    };
    let mut client = pool.get().await.expect("client");
    apply(&mut client, &request('d')).await.expect("deletion");
    let left: Vec<(String, String)> = sql
        .query(
            "SELECT event_type, cloudevent->'data'->>'login_id' FROM outbox ORDER BY id",
            &[],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        !left
            .iter()
            .any(|(t, l)| t == "identity.linked" && *l == person),
        "the person's unpublished event is gone: {left:?}"
    );
    assert!(
        left.iter()
            .any(|(t, l)| t == "identity.linked" && *l == other),
        "another person's event is kept: {left:?}"
    );
    let receipt = sql
        .query_one(
            "SELECT identities, matched_identities, deleted_optins, deleted_links, \
                    deleted_link_conflicts, deleted_outbox_events \
             FROM data_deletions WHERE confirmation_code = $1",
            &[&"d".repeat(48)],
        )
        .await
        .expect("receipt");
    let counts: Vec<i32> = (0..6).map(|i| receipt.get(i)).collect();
    assert_eq!(counts, vec![2, 1, 0, 0, 1, 1]);

    // A request that matches nothing says so: zero identities matched.
    apply(&mut client, &request('e')).await.expect("deletion");
    let matched: i32 = sql
        .query_one(
            "SELECT matched_identities FROM data_deletions WHERE confirmation_code = $1",
            &[&"e".repeat(48)],
        )
        .await
        .expect("receipt")
        .get(0);
    assert_eq!(matched, 0);
}
