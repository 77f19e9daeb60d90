//! A worker's dead letters and its outbox relay share one broker link: a dead letter the
//! broker returns (its dead-letter queue is not bound) must be reported as not stored however
//! busy the relay is, or the consumer would ack the original and the message would be gone.
//! On channels shared round robin, lapin handed the return to whichever confirm completed
//! next — often one of the relay's, which ignores returns.

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, message::Delivery};
use lc_shared::amqp::{AmqpError, BrokerLink};
use lc_shared::events::{IdentityLinked, PublicEvent, insert_outbox};
use lc_shared::shutdown::Shutdown;
use lc_shared::topology;
use lc_testkit::pipeline::{TestEnv, WAIT};
use lc_worker::relay::{self, RelayMetrics};
use lc_worker::runtime::config::RelayArgs;
use lc_worker::runtime::consumer::dead_letter;
use time::OffsetDateTime;

const POISON: usize = 160;

/// Takes `n` messages off `queue` (acked at once: only their bytes and properties matter).
async fn take(env: &TestEnv, queue: &str, n: usize) -> Vec<Delivery> {
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut got = Vec::new();
    while got.len() < n {
        match ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            Some(m) => got.push(m.delivery),
            None => panic!("only {} of {n} messages on {queue}", got.len()),
        }
    }
    got
}

/// Keeps the relay busy: `rounds` transactions of 100 events each.
async fn write_events(pool: deadpool_postgres::Pool, rounds: usize) {
    let mut client = pool.get().await.expect("client");
    for r in 0..rounds {
        let tx = client.transaction().await.expect("begin");
        for n in 0..100 {
            let event = PublicEvent::IdentityLinked(IdentityLinked {
                page_id: "P1".into(),
                login_id: format!("L{r}_{n}"),
                psid: format!("S{r}_{n}"),
                linked_at: OffsetDateTime::now_utc(),
                opted_in_at: None,
                first_reply_mid: None,
            });
            insert_outbox(&*tx, &event, "/loginconnect/test", None)
                .await
                .expect("insert");
        }
        tx.commit().await.expect("commit");
    }
}

/// A quorum queue bound to every public event: its confirms wait for the replicated log, so
/// the relay's publishes are still unconfirmed while dead letters go out on the same link.
async fn quorum_capture(env: &TestEnv) {
    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        "capture-quorum".into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
    ch.queue_bind(
        "capture-quorum".into(),
        topology::EVENTS_EXCHANGE.into(),
        "#".into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_returned_dead_letter_is_never_taken_for_stored_while_the_relay_publishes() {
    let env = TestEnv::new().await;
    let pool = env.migrated_pool(8).await;
    // The worker's one link, as in a scheduler or correlator process: a small pool of
    // channels that the relay and the dead letters both use.
    let link = BrokerLink::start(env.vhost.url(), "worker-test", 2);
    link.wait_ready(WAIT).await.expect("ready");
    // A quorum capture queue makes the relay's confirms wait for the replicated log, so its
    // rounds overlap the dead letters.
    quorum_capture(&env).await;

    let conn = env.vhost.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    // Confirmed publishes, so the poison messages are all enqueued before they are taken.
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let dlq = topology::dead_letter_queue(topology::CORRELATOR_QUEUE);
    ch.queue_unbind(
        dlq.as_str().into(),
        topology::DEAD_LETTER_EXCHANGE.into(),
        topology::CORRELATOR_QUEUE.into(),
        FieldTable::default(),
    )
    .await
    .expect("unbind the dead-letter queue");
    for i in 0..POISON {
        ch.basic_publish(
            "".into(),
            topology::CORRELATOR_QUEUE.into(),
            BasicPublishOptions::default(),
            format!("poison {i}").as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("poison-{i}").into()),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let mut poison = take(&env, topology::CORRELATOR_QUEUE, POISON).await;

    let shutdown = Shutdown::new();
    let relay = tokio::spawn(relay::run(
        pool.clone(),
        link.clone(),
        RelayArgs {
            relay_batch: 200,
            relay_poll_ms: 10,
            relay_confirm_timeout_ms: 5000,
            outbox_retention_hours: 72,
        },
        RelayMetrics::unexported().expect("metrics"),
        shutdown.clone(),
    ));
    let writer = tokio::spawn(write_events(pool.clone(), 100));

    // Sixteen consumers' worth of dead letters at once, each one at a time like a consumer,
    // again and again for as long as the relay has events to publish.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let link = link.clone();
        let writing = writing.clone();
        let part: Vec<Delivery> = poison.drain(..POISON / 16).collect();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                for d in &part {
                    let r = dead_letter(&link, topology::CORRELATOR_QUEUE, &[(d, "poison".into())])
                        .await;
                    results.push(r);
                }
            }
            results
        }));
    }
    writer.await.expect("writer");
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut stored = 0;
    let mut unroutable = 0;
    for t in tasks {
        for r in t.await.expect("task") {
            match r {
                Ok(()) => stored += 1,
                Err(AmqpError::Unroutable) => unroutable += 1,
                Err(e) => panic!("unexpected dead-letter error: {e}"),
            }
        }
    }
    shutdown.trigger();
    relay.await.expect("relay");
    assert!(unroutable >= POISON, "every dead letter was tried");
    assert_eq!(
        stored, 0,
        "a dead letter that reached no queue was reported stored (its original would be acked \
         and lost)"
    );
    link.close().await;
}
