//! Names of every exchange and queue, and their idempotent declaration.
//!
//! Every binary calls [`declare`] at start and after each reconnect, so the topology exists
//! whichever process starts first and a broker that lost it (a reset, a new vhost) gets it back.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

/// Topic exchange that ingest publishes webhook events to (`<kind>.<page_id>`).
pub const WEBHOOK_EXCHANGE: &str = "messenger.webhook";
/// Topic exchange of the public (`identity.*`, `first_message.*`) and operational (`page.*`,
/// `subscription.*`) CloudEvents, routing key `<kind>.<page_id>` (see
/// [`crate::events::routing_key`]).
pub const EVENTS_EXCHANGE: &str = "loginconnect.events";
/// Exchange that work queues dead-letter into; routing key = the work queue's name.
pub const DEAD_LETTER_EXCHANGE: &str = "messenger.dlx";
/// Work queue of the scheduler (bound `optin.*`).
pub const SCHEDULER_QUEUE: &str = "scheduler.optins";
/// Work queue of the correlator (bound `message.*`, `postback.*`).
pub const CORRELATOR_QUEUE: &str = "correlator.replies";
/// Bounded queue of events no worker acts on (echoes, deliveries, reads…), kept for
/// inspection instead of being discarded by the broker (bound `other.*`).
pub const OTHER_QUEUE: &str = "messenger.other";
/// Bounded queue of signed bodies (or single entries and events of them) that could not be
/// parsed, kept raw for inspection and replay.
pub const UNPARSED_QUEUE: &str = "messenger.unparsed";
/// Header naming why a message was dead-lettered or put on [`UNPARSED_QUEUE`].
pub const ERROR_HEADER: &str = "x-loginconnect-error";
/// Header naming the queue a dead-lettered message came from (for replay).
pub const ORIGIN_QUEUE_HEADER: &str = "x-loginconnect-origin-queue";
/// Deliveries after which a quorum work queue dead-letters a message that keeps failing.
pub const DELIVERY_LIMIT: i64 = 10;
/// Most messages kept in [`OTHER_QUEUE`]; the oldest are dropped beyond it.
pub const OTHER_QUEUE_MAX_LENGTH: i64 = 100_000;
/// Most messages kept in [`UNPARSED_QUEUE`]; the oldest are dropped beyond it.
pub const UNPARSED_QUEUE_MAX_LENGTH: i64 = 10_000;
/// Most body bytes kept in each of [`OTHER_QUEUE`] and [`UNPARSED_QUEUE`] (256 MiB); the
/// oldest messages are dropped beyond it.
pub const INSPECTION_QUEUE_MAX_BYTES: i64 = 256 * 1024 * 1024;

/// Work queue of data deletion requests, published by ingest through the default exchange
/// and consumed by the scheduler process (no bindings on [`WEBHOOK_EXCHANGE`]).
pub const DELETION_QUEUE: &str = lc_meta::login::deletion::DELETION_QUEUE;

/// The work queues and the routing-key patterns bound to each on [`WEBHOOK_EXCHANGE`]. Each
/// is a quorum queue with bounded redelivery and at-least-once dead-lettering into its own
/// dead-letter queue.
pub const WORK_QUEUES: [(&str, &[&str]); 3] = [
    (SCHEDULER_QUEUE, &["optin.*"]),
    (CORRELATOR_QUEUE, &["message.*", "postback.*"]),
    (DELETION_QUEUE, &[]),
];

/// Name of the dead-letter queue of a work queue.
pub fn dead_letter_queue(work_queue: &str) -> String {
    format!("{work_queue}.dlq")
}

/// Every queue an operator may want to inspect: dead-letter queues and the unparsed queue.
pub fn inspectable_queues() -> Vec<String> {
    let mut names: Vec<String> = WORK_QUEUES
        .iter()
        .map(|(q, _)| dead_letter_queue(q))
        .collect();
    names.push(UNPARSED_QUEUE.to_owned());
    names
}

/// The work queue a dead-letter queue belongs to (`None` for other queues).
pub fn work_queue_of(dead_letter_queue: &str) -> Option<&str> {
    dead_letter_queue.strip_suffix(".dlq")
}

/// Routing key of a webhook event on [`WEBHOOK_EXCHANGE`].
pub fn webhook_routing_key(kind: &str, page_id: &str) -> String {
    format!("{kind}.{page_id}")
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// Arguments of a quorum work queue: bounded redelivery, then at-least-once dead-lettering
/// (RabbitMQ's default for quorum queues is at-most-once, which could lose a poison message).
fn work_queue_arguments(work_queue: &str) -> FieldTable {
    table(&[
        ("x-queue-type", long("quorum")),
        ("x-delivery-limit", AMQPValue::LongLongInt(DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", long(DEAD_LETTER_EXCHANGE)),
        ("x-dead-letter-routing-key", long(work_queue)),
        ("x-dead-letter-strategy", long("at-least-once")),
        ("x-overflow", long("reject-publish")),
    ])
}

/// Arguments of an inspection queue ([`UNPARSED_QUEUE`], [`OTHER_QUEUE`]): bounded by count
/// and bytes, and beyond the bound the broker drops the oldest message (`drop-head`, no
/// dead-letter exchange). So these queues can never fill the broker's disk (whose alarm
/// would block every publisher, valid deliveries included), and a publish to them is never
/// refused (`reject-publish` would nack it and turn a valid delivery into a 503). What is
/// dropped is counted by the broker (`rabbitmq_global_messages_dead_lettered_maxlen_total`
/// with `dead_letter_strategy="disabled"`) and can be told from what ingest kept
/// (`ingest_inspection_messages_total`).
fn inspection_queue_arguments(max_length: i64) -> FieldTable {
    table(&[
        ("x-queue-type", long("quorum")),
        ("x-max-length", AMQPValue::LongLongInt(max_length)),
        (
            "x-max-length-bytes",
            AMQPValue::LongLongInt(INSPECTION_QUEUE_MAX_BYTES),
        ),
        ("x-overflow", long("drop-head")),
    ])
}

/// Says what to do when an inspection queue exists with other arguments (declared by an
/// older version, before it was bounded): the broker refuses the declaration and the
/// process cannot become ready until the old queue is gone.
fn explain_inequivalent(queue: &str, error: &lapin::Error) {
    if error.to_string().contains("PRECONDITION_FAILED") {
        tracing::error!(
            queue,
            "{queue} exists with other arguments (an older version declared it unbounded): \
             inspect or replay what it holds, then delete it (rabbitmqctl delete_queue {queue}); \
             the next declaration recreates it bounded. See the README, Upgrading"
        );
    }
}

/// Declares the whole topology; safe to call any number of times from any process.
pub async fn declare(channel: &Channel) -> Result<(), lapin::Error> {
    let exchange_opts = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for name in [WEBHOOK_EXCHANGE, EVENTS_EXCHANGE, DEAD_LETTER_EXCHANGE] {
        channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                exchange_opts,
                FieldTable::default(),
            )
            .await?;
    }
    let quorum = table(&[("x-queue-type", long("quorum"))]);
    for (queue, patterns) in WORK_QUEUES {
        channel
            .queue_declare(queue.into(), durable(), work_queue_arguments(queue))
            .await?;
        for pattern in patterns {
            channel
                .queue_bind(
                    queue.into(),
                    WEBHOOK_EXCHANGE.into(),
                    (*pattern).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        let dlq = dead_letter_queue(queue);
        channel
            .queue_declare(dlq.as_str().into(), durable(), quorum.clone())
            .await?;
        channel
            .queue_bind(
                dlq.as_str().into(),
                DEAD_LETTER_EXCHANGE.into(),
                queue.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    for (queue, max_length) in [
        (UNPARSED_QUEUE, UNPARSED_QUEUE_MAX_LENGTH),
        (OTHER_QUEUE, OTHER_QUEUE_MAX_LENGTH),
    ] {
        channel
            .queue_declare(
                queue.into(),
                durable(),
                inspection_queue_arguments(max_length),
            )
            .await
            .inspect_err(|e| explain_inequivalent(queue, e))?;
    }
    channel
        .queue_bind(
            OTHER_QUEUE.into(),
            WEBHOOK_EXCHANGE.into(),
            "other.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
