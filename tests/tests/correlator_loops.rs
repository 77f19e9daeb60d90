//! The correlator with several consumer loops (`CONSUMER_CONCURRENCY`, issue 18 item 2): the
//! same replies — first replies, redeliveries, opt-ins pending, sent or not seen yet, then
//! second PSIDs seen twice — give the same links, opt-in states, conflicts and events with
//! four loops as with one: one link and one `identity.linked` per login_id, one conflict row
//! per second PSID.

use std::time::Duration;

use lc_shared::shutdown::Shutdown;
use lc_shared::topology;
use lc_testkit::pipeline::{
    PAGE, TestEnv, WAIT, eventually, insert_optin, insert_sent_optin, metrics_text, text_reply_item,
};
use lc_worker::correlator::RunningCorrelator;
use serde_json::Value;
use time::OffsetDateTime;
use time::macros::datetime;

/// Login ids in the workload.
const PEOPLE: usize = 240;
/// Replies per posted body.
const PER_BODY: usize = 24;

/// Everything the workload leaves behind that must not depend on the number of loops.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// `(login_id, psid, linked_at, first_reply_mid)` of every link.
    links: Vec<(String, String, String, Option<String>)>,
    /// `(login_id, state, replied)` of every opt-in.
    optins: Vec<(String, String, bool)>,
    /// `(login_id, linked_psid, conflicting_psid)` of every conflict row.
    conflicts: Vec<(String, String, String)>,
    /// `(login_id, psid)` of every `identity.linked` event published.
    events: Vec<(String, String)>,
    /// `correlator_replies_total` by result: linked, duplicate, conflict.
    replies: [u64; 3],
}

fn login(i: usize) -> String {
    format!("L{i:04}")
}

fn first_reply(i: usize) -> Value {
    let at = datetime!(2023-11-14 22:05:00 UTC) + Duration::from_secs(i as u64);
    text_reply_item(PAGE, &format!("PSID{i}"), &format!("m_{i}"), &login(i), at)
}

fn second_psid_reply(i: usize) -> Value {
    let at = datetime!(2023-11-14 23:05:00 UTC) + Duration::from_secs(i as u64);
    text_reply_item(
        PAGE,
        &format!("OTHER{i}"),
        &format!("m_other_{i}"),
        &login(i),
        at,
    )
}

/// Posts `items` through ingest, [`PER_BODY`] to a body.
async fn post_all(ingest: &lc_ingest::RunningIngest, items: Vec<Value>) {
    for chunk in items.chunks(PER_BODY) {
        let status = lc_testkit::pipeline::post_signed(
            ingest,
            lc_testkit::pipeline::body(PAGE, chunk.to_vec()),
        )
        .await;
        assert_eq!(status, 200);
    }
}

/// Replies committed by `correlator` so far (linked, duplicate, conflict).
fn replies(correlator: &RunningCorrelator) -> [u64; 3] {
    ["linked", "duplicate", "conflict"]
        .map(|r| correlator.metrics.replies.with_label_values(&[r]).get())
}

async fn wait_committed(correlator: &RunningCorrelator, n: u64) {
    eventually(WAIT, &format!("{n} replies committed"), || async {
        replies(correlator).iter().sum::<u64>() >= n
    })
    .await;
}

async fn rows(sql: &tokio_postgres::Client, query: &str) -> Vec<tokio_postgres::Row> {
    sql.query(query, &[]).await.expect(query)
}

/// Runs the workload against a fresh environment with `loops` consumer loops.
async fn run(loops: u16) -> Outcome {
    let env = TestEnv::new().await;
    let capture = env.capture_events(&["identity.linked.#"]).await;
    let (ingest, ingest_stop) = env.start_ingest().await;
    let sql = env.sql().await;
    env.migrated_pool(1).await;
    let opted_in = datetime!(2023-11-14 22:00:00 UTC);
    for i in 0..PEOPLE {
        match i % 3 {
            0 => insert_optin(&sql, PAGE, &login(i), opted_in, "pending").await,
            1 => insert_sent_optin(&sql, PAGE, &login(i), opted_in).await,
            _ => {} // the reply comes before its opt-in
        }
    }
    // Every reply twice (a redelivery is the same bytes), queued before the correlator starts
    // so that the loops take them from one backlog.
    let mut items: Vec<Value> = (0..PEOPLE).map(first_reply).collect();
    items.extend((0..PEOPLE).map(first_reply));
    post_all(&ingest, items).await;

    let mut config = env.correlator_config();
    config.consumer_concurrency = Some(loops);
    // Small batches and prefetch, so every loop gets a share of the backlog.
    config.worker.prefetch = 10;
    config.worker.consumer_batch = 5;
    let shutdown = Shutdown::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let correlator = lc_worker::correlator::start(config, listener, shutdown.clone())
        .await
        .expect("start correlator");
    wait_committed(&correlator, 2 * PEOPLE as u64).await;

    // The loops really are separate consumers of the queue, each reported on its own.
    let conn = env.vhost.connect().await;
    let channel = conn.create_channel().await.expect("channel");
    let queue = channel
        .queue_declare(
            topology::CORRELATOR_QUEUE.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("queue");
    assert_eq!(queue.consumer_count(), u32::from(loops));
    let text = metrics_text(correlator.metrics_addr).await;
    let up = text
        .lines()
        .filter(|l| {
            l.starts_with("worker_task_up{task=\"correlator.replies consumer") && l.ends_with(" 1")
        })
        .count();
    assert_eq!(up, usize::from(loops), "{text}");

    // A second PSID for every fourth login_id, seen twice: one conflict row each.
    let mut second: Vec<Value> = (0..PEOPLE).step_by(4).map(second_psid_reply).collect();
    second.extend((0..PEOPLE).step_by(4).map(second_psid_reply));
    let conflicts = second.len() as u64;
    post_all(&ingest, second).await;
    wait_committed(&correlator, 2 * PEOPLE as u64 + conflicts).await;

    let mut events: Vec<(String, String)> = env
        .remaining_events(&capture, "identity.linked")
        .await
        .iter()
        .map(|e| {
            let d = &e["data"];
            let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
            (s("login_id"), s("psid"))
        })
        .collect();
    events.sort();
    let links = rows(
        &sql,
        "SELECT login_id, psid, linked_at, first_reply_mid FROM links ORDER BY login_id",
    )
    .await
    .iter()
    .map(|r| {
        let at: OffsetDateTime = r.get(2);
        (r.get(0), r.get(1), at.to_string(), r.get(3))
    })
    .collect();
    let optins = rows(
        &sql,
        "SELECT login_id, state, replied_at IS NOT NULL FROM optins ORDER BY login_id",
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect();
    let conflict_rows = rows(
        &sql,
        "SELECT login_id, linked_psid, conflicting_psid FROM link_conflicts ORDER BY login_id",
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect();
    let outcome = Outcome {
        links,
        optins,
        conflicts: conflict_rows,
        events,
        replies: replies(&correlator),
    };
    shutdown.trigger();
    tokio::time::timeout(WAIT, correlator.task)
        .await
        .expect("correlator stops in time")
        .expect("join");
    ingest_stop.trigger();
    outcome
}

#[tokio::test]
async fn four_consumer_loops_give_the_same_links_conflicts_and_events_as_one() {
    let one = run(1).await;
    // What one loop gives is what the invariants demand, so the comparison means something.
    assert_eq!(one.links.len(), PEOPLE);
    assert_eq!(one.events.len(), PEOPLE, "one identity.linked per login_id");
    assert!(
        one.events
            .iter()
            .zip(&one.links)
            .all(|(e, l)| e.0 == l.0 && e.1 == l.1),
        "each event names its link"
    );
    assert_eq!(
        one.conflicts.len(),
        PEOPLE.div_ceil(4),
        "one row per second PSID"
    );
    assert_eq!(
        one.replies,
        [PEOPLE as u64, PEOPLE as u64, 2 * PEOPLE.div_ceil(4) as u64]
    );
    let replied = one.optins.iter().filter(|o| o.1 == "replied").count();
    let sent = one.optins.iter().filter(|o| o.1 == "sent").count();
    assert_eq!((replied, sent), (PEOPLE.div_ceil(3), PEOPLE / 3));
    assert!(
        one.optins.iter().all(|o| o.2),
        "every opt-in learnt of its reply"
    );

    let four = run(4).await;
    assert_eq!(four, one);
}
