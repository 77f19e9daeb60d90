//! A second bare-publisher ceiling for the ingest suite, on the `amqprs` client instead of
//! lapin (#18: is lapin's design the wall?). amqprs is tokio-native: its reader and writer are
//! tasks on the runtime, with no IO thread of its own, so a publish is one bounded-channel send
//! to the writer task rather than a hand-off to another OS thread.
//!
//! Same discipline as the lapin ceiling in [`crate::ingest`]: the same messages (built by
//! ingest's own `event_message`), exchange, routing keys, properties, `mandatory`, publisher
//! confirms on the same number of channels, one body's confirms awaited together.
//!
//! amqprs hands confirms to a channel callback (`publish_ack`/`publish_nack` with a delivery
//! tag and `multiple`) instead of returning a future per publish, so each channel keeps a map of
//! delivery tag → oneshot sender, and numbers its publishes itself (the broker numbers them
//! 1, 2, … per channel after `confirm.select`), under a lock held across the send so the
//! numbering and the wire order agree. A `basic.return` (mandatory, unroutable) carries no
//! delivery tag in AMQP, so it cannot be tied to its publish here: returns are counted per
//! channel and reported, where lapin's publisher fails the publish itself.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use lc_shared::outgoing::Outgoing;

use crate::load::OpResult;

/// Errors of the amqprs ceiling.
#[derive(Debug, thiserror::Error)]
pub enum AmqprsError {
    /// Opening the connection or a channel, or switching confirms on, failed.
    #[error("amqprs: {0}")]
    Client(#[from] amqprs::error::Error),
    /// A message property that this converter does not carry over.
    #[error("amqprs: cannot convert property {0}")]
    Property(String),
}

/// A message in amqprs's own types, converted once up front (as lapin's are built once).
#[derive(Debug, Clone)]
pub struct AmqprsMessage {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
}

/// Converts ingest's messages to amqprs's types, property for property.
pub fn convert(msgs: &[Outgoing]) -> Result<Vec<AmqprsMessage>, AmqprsError> {
    msgs.iter()
        .map(|m| {
            Ok(AmqprsMessage {
                exchange: m.exchange.to_owned(),
                routing_key: m.routing_key.clone(),
                body: m.body.clone(),
                properties: properties(&m.properties)?,
            })
        })
        .collect()
}

/// The properties ingest sets (delivery mode, ids, content type, timestamp, type, string
/// headers); anything else is refused rather than silently dropped, so the two publishers
/// cannot drift apart unnoticed.
fn properties(p: &lapin::BasicProperties) -> Result<BasicProperties, AmqprsError> {
    let unsupported = [
        ("content_encoding", p.content_encoding().is_some()),
        ("priority", p.priority().is_some()),
        ("correlation_id", p.correlation_id().is_some()),
        ("reply_to", p.reply_to().is_some()),
        ("expiration", p.expiration().is_some()),
        ("user_id", p.user_id().is_some()),
        ("app_id", p.app_id().is_some()),
        ("cluster_id", p.cluster_id().is_some()),
    ];
    if let Some((name, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(AmqprsError::Property((*name).to_owned()));
    }
    let mut out = BasicProperties::default();
    if let Some(mode) = p.delivery_mode() {
        out.with_delivery_mode(*mode);
    }
    if let Some(id) = p.message_id() {
        out.with_message_id(id.as_str());
    }
    if let Some(ct) = p.content_type() {
        out.with_content_type(ct.as_str());
    }
    if let Some(ts) = p.timestamp() {
        out.with_timestamp(*ts);
    }
    if let Some(kind) = p.kind() {
        out.with_message_type(kind.as_str());
    }
    if let Some(headers) = p.headers() {
        let mut table = FieldTable::new();
        for (k, v) in headers.inner() {
            let value = match v {
                lapin::types::AMQPValue::LongString(s) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                lapin::types::AMQPValue::ShortString(s) => s.as_str().to_owned(),
                other => return Err(AmqprsError::Property(format!("header {k}: {other:?}"))),
            };
            let name = k
                .as_str()
                .try_into()
                .map_err(|_| AmqprsError::Property(format!("header name {k}")))?;
            let value = value
                .try_into()
                .map_err(|_| AmqprsError::Property(format!("header {k}")))?;
            table.insert(name, FieldValue::S(value));
        }
        out.with_headers(table);
    }
    Ok(out.finish())
}

/// Confirms awaited per delivery tag: `true` = ack, `false` = nack.
type Pending = Arc<Mutex<BTreeMap<u64, tokio::sync::oneshot::Sender<bool>>>>;

/// Resolves the pending publishes a confirm covers: `multiple` means every tag up to and
/// including `tag`.
fn resolve(pending: &Pending, tag: u64, multiple: bool, ack: bool) {
    let done: Vec<_> = {
        // A poisoned lock only means another callback panicked; the map is still consistent.
        let mut map = pending.lock().unwrap_or_else(|e| e.into_inner());
        if multiple {
            let rest = map.split_off(&(tag + 1));
            std::mem::replace(&mut *map, rest).into_values().collect()
        } else {
            map.remove(&tag).into_iter().collect()
        }
    };
    for tx in done {
        let _ = tx.send(ack);
    }
}

/// The channel callback: routes confirms to their waiting publishes and counts returns.
struct Confirms {
    pending: Pending,
    returns: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        // Dropping the senders fails every waiting publish.
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        resolve(&self.pending, ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        resolve(&self.pending, nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {
        self.returns.fetch_add(1, Ordering::Relaxed);
    }
}

/// One confirm channel and its numbering.
struct ConfirmChannel {
    channel: Channel,
    /// The next delivery tag; held across the send so tags follow the wire order.
    next_tag: tokio::sync::Mutex<u64>,
    pending: Pending,
    returns: Arc<AtomicU64>,
}

/// A connection with `n` confirm channels.
pub struct AmqprsPublisher {
    conn: Connection,
    channels: Arc<Vec<ConfirmChannel>>,
}

impl AmqprsPublisher {
    /// Connects to `url` (the same vhost as the lapin ceiling) and opens `n` confirm channels.
    pub async fn connect(url: &str, n: usize) -> Result<Self, AmqprsError> {
        let args = OpenConnectionArguments::try_from(url)?;
        let conn = Connection::open(&args).await?;
        let mut channels = Vec::with_capacity(n.max(1));
        for _ in 0..n.max(1) {
            let channel = conn.open_channel(None).await?;
            let pending = Pending::default();
            let returns = Arc::new(AtomicU64::new(0));
            // Registered before `confirm.select`, so no confirm can arrive without it.
            channel
                .register_callback(Confirms {
                    pending: pending.clone(),
                    returns: returns.clone(),
                })
                .await?;
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await?;
            channels.push(ConfirmChannel {
                channel,
                next_tag: tokio::sync::Mutex::new(1),
                pending,
                returns,
            });
        }
        Ok(Self {
            conn,
            channels: Arc::new(channels),
        })
    }

    /// Messages returned as unroutable so far, over all channels (0 is right).
    pub fn returned(&self) -> u64 {
        self.channels
            .iter()
            .map(|c| c.returns.load(Ordering::Relaxed))
            .sum()
    }

    /// Closes the channels and the connection.
    pub async fn close(self) {
        if let Ok(channels) = Arc::try_unwrap(self.channels) {
            for c in channels {
                let _ = c.channel.close().await;
            }
        }
        let _ = self.conn.close().await;
    }

    /// One body's messages per call: publish all, then await all confirms (the shape of
    /// `ingest::publish_op`, channel chosen the same way).
    pub fn publish_op(
        &self,
        messages: &Arc<Vec<Arc<Vec<AmqprsMessage>>>>,
    ) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn Future<Output = OpResult> + Send>>
    + Send
    + Sync
    + 'static {
        let (channels, messages) = (self.channels.clone(), messages.clone());
        move |worker, i| {
            let n = worker * 7 + i as usize;
            let msgs = messages[n % messages.len()].clone();
            let channels = channels.clone();
            let idx = n % channels.len();
            Box::pin(async move {
                let ch = &channels[idx];
                let mut confirms = Vec::with_capacity(msgs.len());
                for m in msgs.iter() {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let mut next = ch.next_tag.lock().await;
                    let tag = *next;
                    ch.pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(tag, tx);
                    let mut args = BasicPublishArguments::new(&m.exchange, &m.routing_key);
                    args.mandatory = true;
                    if let Err(e) = ch
                        .channel
                        .basic_publish(m.properties.clone(), m.body.clone(), args)
                        .await
                    {
                        ch.pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&tag);
                        return Err(e.to_string());
                    }
                    *next += 1;
                    drop(next);
                    confirms.push(rx);
                }
                for rx in confirms {
                    match rx.await {
                        Ok(true) => {}
                        Ok(false) => return Err("nacked".to_owned()),
                        Err(_) => return Err("channel closed before the confirm".to_owned()),
                    }
                }
                Ok(msgs.len() as u64)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_confirm_resolves_every_tag_up_to_it() {
        let pending = Pending::default();
        let mut rxs = Vec::new();
        for tag in 1..=5 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            pending.lock().unwrap().insert(tag, tx);
            rxs.push(rx);
        }
        resolve(&pending, 3, true, true);
        resolve(&pending, 5, false, false);
        let got: Vec<_> = rxs.into_iter().map(|mut rx| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            vec![Some(true), Some(true), Some(true), None, Some(false)]
        );
        assert_eq!(pending.lock().unwrap().len(), 1);
    }
}
