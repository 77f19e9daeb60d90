//! The relay's `LISTEN loginconnect_outbox` connection: turns the outbox insert trigger's
//! notifications into wake-ups, reconnecting whenever the connection drops.
//!
//! It has to be its own connection, driven here with `poll_message`: a pooled connection's
//! driver discards notifications. While it is down the relay still polls, so a lost
//! notification delays an event by at most one poll interval.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lc_shared::amqp::reconnect_backoff;
use lc_shared::db::Target;
use lc_shared::shutdown::Shutdown;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;

/// The channel the `outbox_notify` trigger notifies.
pub(super) const CHANNEL: &str = "loginconnect_outbox";

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("the server closed the connection")]
    Closed,
}

/// Keeps a listening connection up until `shutdown`, waking `wake` on every notification.
pub(super) async fn run(mut target: Target, wake: Arc<Notify>, shutdown: Shutdown) {
    // Bound the connect, and notice a silently dead peer well before the OS default of hours.
    target
        .config
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .application_name("loginconnect-outbox-relay");
    let mut delays = reconnect_backoff();
    while !shutdown.is_triggered() {
        let mut subscribed = false;
        match listen(&target, &wake, &shutdown, &mut subscribed).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "outbox LISTEN connection lost; polling until it is back");
            }
        }
        if subscribed {
            // It worked for a while: start the backoff over rather than waiting long.
            delays = reconnect_backoff();
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(10));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// One connection's life: `Ok` on shutdown, `Err` when it fails; `subscribed` tells whether
/// `LISTEN` got through first.
async fn listen(
    target: &Target,
    wake: &Notify,
    shutdown: &Shutdown,
    subscribed: &mut bool,
) -> Result<(), ListenError> {
    let (client, mut connection) = target.config.connect(target.tls.clone()).await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {CHANNEL}");
    let subscribe = client.batch_execute(&statement);
    tokio::pin!(subscribe);
    // The connection only makes progress while polled, so drive it while LISTEN runs.
    loop {
        tokio::select! {
            r = &mut subscribe => { r?; break; }
            m = messages.next() => handle(m, wake)?,
        }
    }
    tracing::debug!("listening for outbox notifications");
    *subscribed = true;
    // Rows inserted while nobody listened would otherwise wait for the next poll.
    wake.notify_one();
    loop {
        tokio::select! {
            m = messages.next() => handle(m, wake)?,
            // Returning drops the client, which ends the session.
            () = shutdown.wait() => return Ok(()),
        }
    }
}

fn handle(
    message: Option<Result<AsyncMessage, tokio_postgres::Error>>,
    wake: &Notify,
) -> Result<(), ListenError> {
    match message {
        Some(Ok(AsyncMessage::Notification(_))) => {
            wake.notify_one();
            Ok(())
        }
        Some(Ok(AsyncMessage::Notice(notice))) => {
            tracing::debug!(
                message = notice.message(),
                "notice on the outbox LISTEN connection"
            );
            Ok(())
        }
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(e.into()),
        None => Err(ListenError::Closed),
    }
}
