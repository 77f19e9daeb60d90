//! A batched, supervised AMQP consumer that acks only after the handler has committed.
//!
//! Deliveries that are ready are handed over together (up to a batch size) so the handler can
//! commit them in one transaction. A handler error (database down) does not nack: the batch is
//! retried in-process with backoff, because every nack of a quorum queue counts toward its
//! delivery limit and an outage would otherwise push healthy messages to the dead-letter
//! queue. Messages the handler rejects are re-published to the dead-letter exchange with the
//! reason in a header, then acked.
//!
//! [`spawn_supervised`] runs a consumer under [`process::spawn_supervised`]: restarted if its
//! handler panics, and reported down (so `/readyz` fails) until it is subscribed again.

use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lc_shared::amqp::{self, AmqpError, BrokerLink, Outcome};
use lc_shared::shutdown::Shutdown;
use lc_shared::topology;
use tokio::task::JoinSet;

use crate::runtime::process::{self, TaskUp};

/// What to do with one delivery after the handler ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Processed (committed): acknowledge.
    Ack,
    /// Cannot ever be processed: move to the dead-letter queue with this reason.
    DeadLetter(String),
}

/// What the handler sees of one delivery (cheap to clone for a retry).
#[derive(Debug, Clone)]
pub struct Incoming {
    /// Message body.
    pub data: Vec<u8>,
    /// Routing key it was published with.
    pub routing_key: String,
    /// AMQP properties (message id, headers, timestamp).
    pub properties: lapin::BasicProperties,
    /// True if the broker delivered it before (a previous consumer did not ack).
    pub redelivered: bool,
}

impl From<&Delivery> for Incoming {
    fn from(d: &Delivery) -> Self {
        Self {
            data: d.data.clone(),
            routing_key: d.routing_key.to_string(),
            properties: d.properties.clone(),
            redelivered: d.redelivered,
        }
    }
}

/// Settings of one consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Queue to consume.
    pub queue: &'static str,
    /// Unacked deliveries the broker may push ahead (AMQP prefetch).
    pub prefetch: u16,
    /// Most deliveries handed to the handler at once.
    pub max_batch: usize,
    /// Consumer tag prefix (the broker UI shows it).
    pub tag: String,
}

/// Runs until `shutdown`: consumes `settings.queue` and calls `handler` with each batch of
/// ready deliveries. The handler returns one verdict per delivery, in order, or an error to
/// have the same batch retried.
pub async fn run<H, F, E>(
    link: BrokerLink,
    settings: ConsumerSettings,
    shutdown: Shutdown,
    handler: H,
) where
    H: Fn(Vec<Incoming>) -> F,
    F: Future<Output = Result<Vec<Verdict>, E>>,
    E: std::fmt::Display,
{
    run_reporting(link, settings, shutdown, handler, None).await;
}

/// Spawns [`run`] into `tasks` under [`process::spawn_supervised`] (task `{queue} consumer`):
/// if the handler panics, the consumer's channel closes (its unacknowledged deliveries
/// return to the queue), the task is restarted after a backoff, and it is reported down —
/// `/readyz` fails — from the panic until it has subscribed again.
pub fn spawn_supervised<H, F, E>(
    tasks: &mut JoinSet<()>,
    registry: &prometheus::Registry,
    link: &BrokerLink,
    settings: ConsumerSettings,
    shutdown: &Shutdown,
    handler: H,
) -> Result<(), prometheus::Error>
where
    H: Fn(Vec<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Vec<Verdict>, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    spawn_supervised_loops(tasks, registry, link, settings, 1, shutdown, handler)
}

/// [`spawn_supervised`] `loops` times: that many consumers of `settings.queue`, each on its
/// own channel (with its own prefetch) and handling its own batches, so one loop's commit
/// does not wait for another's. With one loop the task is `{queue} consumer`, with more
/// `{queue} consumer 1` … `{queue} consumer N` (each reported by `/readyz` on its own).
///
/// The broker hands each delivery to one of them, so batches of the same queue commit
/// concurrently, as they do across replicas: the handler must be safe for that (idempotent
/// writes, a fixed lock order).
pub fn spawn_supervised_loops<H, F, E>(
    tasks: &mut JoinSet<()>,
    registry: &prometheus::Registry,
    link: &BrokerLink,
    settings: ConsumerSettings,
    loops: usize,
    shutdown: &Shutdown,
    handler: H,
) -> Result<(), prometheus::Error>
where
    H: Fn(Vec<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Vec<Verdict>, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let loops = loops.max(1);
    for i in 1..=loops {
        let (name, tag) = if loops == 1 {
            (format!("{} consumer", settings.queue), settings.tag.clone())
        } else {
            (
                format!("{} consumer {i}", settings.queue),
                format!("{}-{i}", settings.tag),
            )
        };
        let settings = ConsumerSettings {
            tag,
            ..settings.clone()
        };
        let (link, stop, handler) = (link.clone(), shutdown.clone(), handler.clone());
        process::spawn_supervised(tasks, registry, &name, shutdown, move |up| {
            run_reporting(
                link.clone(),
                settings.clone(),
                stop.clone(),
                handler.clone(),
                Some(up),
            )
        })?;
    }
    Ok(())
}

/// [`run`], reporting through `up` (if any) whether it is subscribed.
async fn run_reporting<H, F, E>(
    link: BrokerLink,
    settings: ConsumerSettings,
    shutdown: Shutdown,
    handler: H,
    up: Option<TaskUp>,
) where
    H: Fn(Vec<Incoming>) -> F,
    F: Future<Output = Result<Vec<Verdict>, E>>,
    E: std::fmt::Display,
{
    let mut reconnect = amqp::reconnect_backoff();
    while !shutdown.is_triggered() {
        tokio::select! {
            r = link.wait_ready(Duration::from_secs(3600)) => if r.is_err() { continue },
            () = shutdown.wait() => return,
        }
        match consume_until_lost(&link, &settings, &shutdown, &handler, up.as_ref()).await {
            Ok(()) => return,
            Err(e) => {
                if let Some(up) = &up {
                    up.down();
                }
                tracing::warn!(queue = settings.queue, error = %e, "consumer lost its channel; resubscribing");
                let delay = reconnect.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.wait() => return,
                }
            }
        }
    }
}

async fn consume_until_lost<H, F, E>(
    link: &BrokerLink,
    settings: &ConsumerSettings,
    shutdown: &Shutdown,
    handler: &H,
    up: Option<&TaskUp>,
) -> Result<(), AmqpError>
where
    H: Fn(Vec<Incoming>) -> F,
    F: Future<Output = Result<Vec<Verdict>, E>>,
    E: std::fmt::Display,
{
    let channel = link.open_channel().await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("{}-{}", settings.tag, uuid::Uuid::new_v4().simple());
    let consumer = channel
        .basic_consume(
            settings.queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(
        queue = settings.queue,
        prefetch = settings.prefetch,
        "consuming"
    );
    if let Some(up) = up {
        up.up();
    }
    let mut batches = consumer.ready_chunks(settings.max_batch.max(1));
    loop {
        let chunk = tokio::select! {
            c = batches.next() => c,
            () = shutdown.wait() => {
                // Stop the flow first; anything already pushed but unprocessed is returned
                // to the queue when the channel closes.
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                let _ = channel.close(200, "shutdown".into()).await;
                return Ok(());
            }
        };
        let Some(chunk) = chunk else {
            return Err(AmqpError::NotConnected);
        };
        let mut deliveries = Vec::with_capacity(chunk.len());
        for item in chunk {
            deliveries.push(item?);
        }
        let Some(verdicts) =
            handle_with_retry(handler, &deliveries, shutdown, settings.queue).await
        else {
            // Shutting down mid-retry: give the batch back untouched (not a poison signal
            // worth counting, but the broker counts it; the limit leaves ample room).
            for d in &deliveries {
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        multiple: false,
                    })
                    .await;
            }
            let _ = channel.close(200, "shutdown".into()).await;
            return Ok(());
        };
        settle(link, settings.queue, &deliveries, verdicts).await?;
    }
}

/// Calls the handler until it succeeds or shutdown fires (`None`).
async fn handle_with_retry<H, F, E>(
    handler: &H,
    deliveries: &[Delivery],
    shutdown: &Shutdown,
    queue: &str,
) -> Option<Vec<Verdict>>
where
    H: Fn(Vec<Incoming>) -> F,
    F: Future<Output = Result<Vec<Verdict>, E>>,
    E: std::fmt::Display,
{
    let mut delays = amqp::reconnect_backoff();
    loop {
        match handler(deliveries.iter().map(Incoming::from).collect()).await {
            Ok(verdicts) => return Some(verdicts),
            Err(e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::error!(queue, error = %e, retry_in_ms = delay.as_millis(), batch = deliveries.len(), "handling failed; retrying the batch");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.wait() => return None,
                }
            }
        }
    }
}

async fn settle(
    link: &BrokerLink,
    queue: &str,
    deliveries: &[Delivery],
    verdicts: Vec<Verdict>,
) -> Result<(), AmqpError> {
    let all_ack = verdicts.iter().all(|v| *v == Verdict::Ack) && verdicts.len() == deliveries.len();
    if all_ack {
        if let Some(last) = deliveries.last() {
            // Batches are handled one at a time, so every earlier delivery on this channel is
            // settled already: one multiple-ack covers the batch.
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        return Ok(());
    }
    let dead: Vec<(&Delivery, String)> = deliveries
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            match verdicts
                .get(i)
                .cloned()
                .unwrap_or_else(|| Verdict::DeadLetter("handler returned no verdict".into()))
            {
                Verdict::DeadLetter(reason) => Some((d, reason)),
                Verdict::Ack => None,
            }
        })
        .collect();
    if !dead.is_empty() {
        // Every dead letter must be stored before any original is acked; otherwise the whole
        // batch comes back (its commits are idempotent) rather than losing one.
        dead_letter(link, queue, &dead).await?;
    }
    for d in deliveries {
        d.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// Bound on storing a batch's dead letters.
const DEAD_LETTER_CONFIRM: Duration = Duration::from_secs(5);

/// Re-publishes deliveries to the dead-letter exchange with their reasons, mandatory, on a
/// channel leased for them alone, and awaits every confirm before the caller acks the
/// originals (so each message exists in one of the two places). A dead letter the broker
/// returns (its dead-letter queue is not bound) or refuses fails the whole call: on a shared
/// channel its return could have been pinned on someone else's publish and the original
/// acked although it was stored nowhere.
pub async fn dead_letter(
    link: &BrokerLink,
    queue: &str,
    dead: &[(&Delivery, String)],
) -> Result<(), AmqpError> {
    let mut lease = link.lease(DEAD_LETTER_CONFIRM).await?;
    for (delivery, reason) in dead {
        tracing::warn!(queue, reason, message_id = ?delivery.properties.message_id(), "dead-lettering message");
        lease
            .publish(
                topology::DEAD_LETTER_EXCHANGE,
                queue,
                true,
                &delivery.data,
                dead_letter_properties(queue, delivery, reason),
            )
            .await?;
    }
    let outcomes = lease.settle(DEAD_LETTER_CONFIRM).await;
    match outcomes.iter().find(|o| **o != Outcome::Stored) {
        None => Ok(()),
        Some(Outcome::Returned) => {
            tracing::error!(
                queue,
                "dead letter returned as unroutable; the batch is not acked"
            );
            Err(AmqpError::Unroutable)
        }
        Some(Outcome::Nacked) => Err(AmqpError::Nacked),
        Some(_) => Err(AmqpError::ConfirmTimeout(DEAD_LETTER_CONFIRM)),
    }
}

/// The original properties plus the reason, the origin queue and the original routing key.
fn dead_letter_properties(
    queue: &str,
    delivery: &Delivery,
    reason: &str,
) -> lapin::BasicProperties {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(topology::ERROR_HEADER),
        AMQPValue::LongString(LongString::from(reason)),
    );
    headers.insert(
        ShortString::from(topology::ORIGIN_QUEUE_HEADER),
        AMQPValue::LongString(LongString::from(queue)),
    );
    headers.insert(
        ShortString::from("x-loginconnect-original-routing-key"),
        AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
    );
    delivery
        .properties
        .clone()
        .with_headers(headers)
        .with_delivery_mode(2)
}
