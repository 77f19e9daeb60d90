//! Exclusive confirm channels: one channel per batch of publishes in flight, so every
//! broker answer (ack, nack, returned message) is attributed to the publish it belongs to.
//!
//! Why not share channels: lapin keeps a channel's returned messages in one first-in-first-out
//! queue and hands the front one to whichever confirm it completes next, and it completes
//! the tags of a `multiple=true` ack in hash-map order. On a channel shared by concurrent
//! requests, the return of one request's message can be pinned on another request's confirm:
//! one answers `200` for a message the broker dropped, the other a spurious failure.
//!
//! On a leased channel only the lease holder publishes. RabbitMQ sends a mandatory message's
//! `basic.return` before its `basic.ack`, and lapin pops one waiting return per completed
//! confirm, so once every confirm of a lease has completed, every return of the lease has been
//! handed to one of the lease's own confirms (the queue never holds more returns than there
//! are returned messages still unconfirmed). Which of its confirms got which return is still
//! arbitrary, so returns are matched to messages by `message_id`.
//!
//! A lease goes back to the pool only when nothing is pending on its channel; a lease
//! dropped with confirms outstanding (a timeout, a cancelled request) closes its channel, so
//! a late return can never reach the next holder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{AmqpError, confirm_channel, publish};

/// What the broker did with one message of a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Confirmed (`basic.ack`) and not returned: the broker has taken responsibility for it.
    Stored,
    /// Refused (`basic.nack`), e.g. by a queue with `x-overflow=reject-publish` that is full.
    Nacked,
    /// A mandatory message that matched no queue (`basic.return`); the broker dropped it.
    Returned,
    /// No answer within the bound, or the channel failed first: it may or may not be stored.
    Unconfirmed,
}

/// The channels of one connection: idle ones for reuse and a bound on how many are leased.
pub(crate) struct ChannelPool {
    connection: Arc<Connection>,
    idle: Mutex<Vec<Channel>>,
    permits: Arc<Semaphore>,
    /// Woken when a leased channel was found closed by the broker (the supervisor then
    /// reconnects and re-declares the topology, which may be what the broker missed).
    closed: Arc<Notify>,
    /// Set once the connection is being replaced: a lease of the old connection that ends
    /// later must not make the supervisor drop the new one.
    retired: AtomicBool,
}

impl ChannelPool {
    /// A pool on `connection` leasing at most `max` channels at once; `first` is an open
    /// confirm channel to start with.
    pub(crate) fn new(
        connection: Arc<Connection>,
        first: Channel,
        max: usize,
        closed: Arc<Notify>,
    ) -> Self {
        Self {
            connection,
            idle: Mutex::new(vec![first]),
            permits: Arc::new(Semaphore::new(max.max(1))),
            closed,
            retired: AtomicBool::new(false),
        }
    }

    /// Makes publishers waiting for a channel of this connection give up at once (the
    /// connection is being replaced or closed).
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.permits.close();
    }

    /// Closes every idle channel (on shutdown).
    pub(crate) async fn close_idle(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for ch in idle {
            let _ = ch.close(200, "shutdown".into()).await;
        }
    }

    /// Leases a channel, waiting at most `wait` for one to be free.
    pub(crate) async fn lease(self: &Arc<Self>, wait: Duration) -> Result<ChannelLease, AmqpError> {
        let permit = tokio::time::timeout(wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| AmqpError::ConfirmTimeout(wait))?
            .map_err(|_| AmqpError::NotConnected)?;
        let reused = loop {
            let next = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(ch) if ch.status().connected() => break Some(ch),
                Some(_) => continue, // closed while idle: dropping it is all there is to do
                None => break None,
            }
        };
        let channel = match reused {
            Some(ch) => ch,
            None => {
                let open = confirm_channel(&self.connection);
                tokio::time::timeout(wait, open)
                    .await
                    .map_err(|_| AmqpError::ConfirmTimeout(wait))??
            }
        };
        Ok(ChannelLease {
            channel: Some(channel),
            pool: self.clone(),
            _permit: permit,
            pending: Vec::new(),
            clean: true,
        })
    }
}

/// One published message awaiting its confirm.
struct Pending {
    message_id: Option<String>,
    mandatory: bool,
    confirm: lapin::PublisherConfirm,
}

/// A confirm channel held exclusively; publish on it, then [`ChannelLease::settle`].
///
/// Dropping the lease returns the channel to the pool if every confirm was settled, and
/// closes it otherwise.
pub struct ChannelLease {
    channel: Option<Channel>,
    pool: Arc<ChannelPool>,
    _permit: OwnedSemaphorePermit,
    pending: Vec<Pending>,
    /// False once something may be outstanding on the channel (a publish whose confirm was
    /// not settled, a failed publish).
    clean: bool,
}

impl ChannelLease {
    /// Publishes one message; its outcome comes from the next [`ChannelLease::settle`].
    /// `mandatory` makes an unroutable message come back as [`Outcome::Returned`].
    pub async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let channel = self.channel.as_ref().ok_or(AmqpError::NotConnected)?;
        let message_id = properties.message_id().as_ref().map(|m| m.to_string());
        self.clean = false;
        let confirm = publish(channel, exchange, routing_key, mandatory, body, properties).await?;
        self.pending.push(Pending {
            message_id,
            mandatory,
            confirm,
        });
        Ok(())
    }

    /// Awaits the confirms of every message published since the last settle, within `bound`,
    /// and returns each message's outcome in publish order.
    ///
    /// Returns are matched to messages by `message_id` (a returned message without one, or
    /// one no message of the lease carries, makes every mandatory message of the batch
    /// `Returned`: failing too many is safe, pinning the loss on none is not). When any
    /// confirm is missing, the lease cannot know whether a return is still to come, so its
    /// confirmed mandatory messages are reported `Unconfirmed` too.
    pub async fn settle(&mut self, bound: Duration) -> Vec<Outcome> {
        let pending = std::mem::take(&mut self.pending);
        let deadline = tokio::time::Instant::now() + bound;
        let mut outcomes = Vec::with_capacity(pending.len());
        let mut returned_ids: Vec<Option<String>> = Vec::new();
        let mut complete = true;
        let mut meta = Vec::with_capacity(pending.len());
        for p in pending {
            meta.push((p.message_id, p.mandatory));
            let answer = tokio::time::timeout_at(deadline, p.confirm).await;
            let (outcome, returned) = match answer {
                Ok(Ok(lapin::Confirmation::Ack(r))) => (Outcome::Stored, r),
                Ok(Ok(lapin::Confirmation::Nack(r))) => (Outcome::Nacked, r),
                // Confirm mode is always on for leased channels; treat the impossible as
                // not confirmed rather than as stored.
                Ok(Ok(lapin::Confirmation::NotRequested)) | Ok(Err(_)) | Err(_) => {
                    complete = false;
                    (Outcome::Unconfirmed, None)
                }
            };
            if let Some(message) = returned {
                returned_ids.push(
                    message
                        .delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|m| m.to_string()),
                );
            }
            outcomes.push(outcome);
        }
        if complete {
            self.clean = true;
        }
        attribute_returns(&mut outcomes, &meta, &returned_ids, complete);
        outcomes
    }
}

/// Marks returned messages (matched by id) and, when the batch is incomplete, every
/// confirmed mandatory message as not known.
fn attribute_returns(
    outcomes: &mut [Outcome],
    meta: &[(Option<String>, bool)],
    returned_ids: &[Option<String>],
    complete: bool,
) {
    let unmatched = returned_ids.iter().any(|id| match id {
        None => true,
        Some(id) => !meta.iter().any(|(m, _)| m.as_deref() == Some(id.as_str())),
    });
    for (outcome, (id, mandatory)) in outcomes.iter_mut().zip(meta) {
        if *outcome != Outcome::Stored || !mandatory {
            continue;
        }
        let matched = id
            .as_deref()
            .is_some_and(|id| returned_ids.iter().any(|r| r.as_deref() == Some(id)));
        if matched || unmatched {
            *outcome = Outcome::Returned;
        } else if !complete {
            *outcome = Outcome::Unconfirmed;
        }
    }
}

impl Drop for ChannelLease {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        if self.clean && self.pending.is_empty() && channel.status().connected() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(channel);
        } else if !channel.status().connected()
            && self.pool.connection.status().connected()
            && !self.pool.retired.load(Ordering::SeqCst)
        {
            // The broker closed this channel on a live connection (e.g. a publish to a
            // missing exchange): reconnect and re-declare rather than keep opening channels
            // into the same error. A lost connection is the supervisor's to notice.
            self.pool.closed.notify_one();
        }
        // Otherwise the channel drops here; lapin closes a channel when its last handle
        // goes, so outstanding confirms or returns die with it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ids: &[&str]) -> Vec<(Option<String>, bool)> {
        ids.iter().map(|i| (Some((*i).to_owned()), true)).collect()
    }

    #[test]
    fn a_return_is_pinned_on_the_message_with_its_id_whichever_confirm_carried_it() {
        let mut outcomes = vec![Outcome::Stored, Outcome::Stored, Outcome::Stored];
        attribute_returns(
            &mut outcomes,
            &meta(&["a", "b", "c"]),
            &[Some("c".into())],
            true,
        );
        assert_eq!(
            outcomes,
            vec![Outcome::Stored, Outcome::Stored, Outcome::Returned]
        );
    }

    #[test]
    fn an_unknown_return_fails_every_mandatory_message() {
        let mut outcomes = vec![Outcome::Stored, Outcome::Nacked];
        attribute_returns(&mut outcomes, &meta(&["a", "b"]), &[None], true);
        assert_eq!(outcomes, vec![Outcome::Returned, Outcome::Nacked]);
    }

    #[test]
    fn an_incomplete_batch_trusts_no_mandatory_ack() {
        let mut outcomes = vec![Outcome::Stored, Outcome::Unconfirmed];
        attribute_returns(&mut outcomes, &meta(&["a", "b"]), &[], false);
        assert_eq!(outcomes, vec![Outcome::Unconfirmed, Outcome::Unconfirmed]);
        let mut optional = vec![Outcome::Stored];
        attribute_returns(&mut optional, &[(Some("x".into()), false)], &[], false);
        assert_eq!(optional, vec![Outcome::Stored], "non-mandatory acks stand");
    }
}
