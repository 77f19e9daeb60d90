//! Connecting to RabbitMQ and publishing with publisher confirms.
//!
//! lapin has a history of connections that die silently and confirms that never arrive, so
//! nothing here trusts the connection to recover by itself: callers get a [`BrokerLink`] that
//! notices a lost connection (its event stream reports an error or ends), reports itself not
//! ready, reconnects with backoff and re-declares the topology.

mod lease;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Event};
use tokio::sync::{Notify, watch};

use crate::config::redact_url;
use crate::topology;

use lease::ChannelPool;
pub use lease::{ChannelLease, Outcome};
pub use tls::{TlsFiles, TlsSettingsError};

/// Errors of connecting and publishing.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The broker could not be reached or refused the connection.
    #[error(
        "cannot connect to RabbitMQ at {url}: {source} (check AMQP_URL and that the broker is running)"
    )]
    Connect {
        /// The URL with its password removed.
        url: String,
        /// What lapin reported.
        source: lapin::Error,
    },
    /// The TLS handshake with a node failed (or the node refused our certificate).
    #[error("TLS with RabbitMQ at {url} failed: {cause}; {fix}")]
    Tls {
        /// The node's URL with its password removed.
        url: String,
        /// What rustls reported, and which CA and client certificate were in use.
        cause: String,
        /// Which setting to change.
        fix: String,
    },
    /// An `AMQP_TLS_*` setting cannot be used.
    #[error(transparent)]
    TlsSettings(#[from] TlsSettingsError),
    /// A channel operation failed (the connection or channel is probably gone).
    #[error("RabbitMQ channel error: {0}")]
    Channel(#[from] lapin::Error),
    /// No channel is open because the broker connection is down.
    #[error("not connected to RabbitMQ")]
    NotConnected,
    /// The broker refused to take responsibility for a message.
    #[error("RabbitMQ nacked the message")]
    Nacked,
    /// A mandatory message matched no queue and was returned (the topology is incomplete).
    #[error("RabbitMQ returned the message as unroutable (is the topology declared?)")]
    Unroutable,
    /// The broker did not confirm in time; the message may or may not be stored.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// A node did not complete the connection in time (unreachable, or overloaded).
    #[error("RabbitMQ at {url} did not answer within {timeout:?} (check AMQP_URL and the network)")]
    ConnectTimeout {
        /// The node's URL with its password removed.
        url: String,
        /// How long it was given.
        timeout: Duration,
    },
}

/// How long one node may take to accept a connection before the next is tried.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The nodes `AMQP_URL` names: one URL, or several separated by commas (the nodes of a
/// cluster, each with the vhost), in the order given.
pub fn nodes(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect()
}

/// Where RabbitMQ is: the nodes of `AMQP_URL` and the TLS files for `amqps://`. Built from a
/// bare URL (`"amqp://…".into()`) it has no TLS files: plain AMQP, or lapin's default TLS.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AmqpEndpoint {
    url: String,
    tls: TlsFiles,
}

impl AmqpEndpoint {
    /// `url` (one node or several, see [`nodes`]) with the TLS files `tls`, checked: the
    /// files are read once and every node must be `amqps://` when files are given.
    pub fn new(url: &str, tls: TlsFiles) -> Result<Self, TlsSettingsError> {
        tls.validate(&nodes(url))?;
        Ok(Self {
            url: url.to_owned(),
            tls,
        })
    }

    /// The URL (with its password: never log it, see [`redact_url`]).
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl std::fmt::Debug for AmqpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpEndpoint")
            .field("url", &redact_url(&self.url))
            .field("tls", &self.tls)
            .finish()
    }
}

impl From<&str> for AmqpEndpoint {
    fn from(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            tls: TlsFiles::default(),
        }
    }
}

impl From<&String> for AmqpEndpoint {
    fn from(url: &String) -> Self {
        url.as_str().into()
    }
}

impl From<String> for AmqpEndpoint {
    fn from(url: String) -> Self {
        url.as_str().into()
    }
}

impl From<&AmqpEndpoint> for AmqpEndpoint {
    fn from(endpoint: &AmqpEndpoint) -> Self {
        endpoint.clone()
    }
}

/// Opens one connection, named so operators can tell processes apart in the broker's UI, to
/// the first of the endpoint's [`nodes`] that accepts it.
pub async fn connect(
    endpoint: impl Into<AmqpEndpoint>,
    connection_name: &str,
) -> Result<Connection, AmqpError> {
    connect_from(&endpoint.into(), connection_name, 0)
        .await
        .map(|(connection, _)| connection)
}

/// [`connect`], trying the nodes from index `start` on (wrapping around); returns the
/// connection and the index of the node that took it. Every node gets
/// `NODE_CONNECT_TIMEOUT`; the error is the last node's.
async fn connect_from(
    endpoint: &AmqpEndpoint,
    connection_name: &str,
    start: usize,
) -> Result<(Connection, usize), AmqpError> {
    let nodes = nodes(&endpoint.url);
    let mut last = None;
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(connection_name.to_owned()));
        let attempt = tokio::time::timeout(
            NODE_CONNECT_TIMEOUT,
            open_node(nodes[i], &endpoint.tls, props),
        );
        let error = match attempt.await {
            Ok(Ok(connection)) => return Ok((connection, i)),
            Ok(Err(error)) => error,
            Err(_) => AmqpError::ConnectTimeout {
                url: redact_url(nodes[i]),
                timeout: NODE_CONNECT_TIMEOUT,
            },
        };
        if nodes.len() > 1 {
            tracing::warn!(error = %error, "RabbitMQ node not available; trying the next");
        }
        last = Some(error);
    }
    Err(last.unwrap_or(AmqpError::NotConnected))
}

/// One connection to `node`: through our own rustls configuration when TLS files are set
/// (see the `tls` module for why), through lapin's own connect otherwise. A failure caused by
/// TLS comes back as [`AmqpError::Tls`], naming the cause and the setting to change.
async fn open_node(
    node: &str,
    tls: &TlsFiles,
    props: ConnectionProperties,
) -> Result<Connection, AmqpError> {
    let result = match tls.client_config()? {
        None => Connection::connect(node, props).await,
        Some(config) => tls::connect(node, config, props).await,
    };
    result.map_err(|source| match tls::explain(&source, tls) {
        Some((cause, fix)) => AmqpError::Tls {
            url: redact_url(node),
            cause,
            fix,
        },
        None => AmqpError::Connect {
            url: redact_url(node),
            source,
        },
    })
}

/// Opens a channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// The exponential, fully jittered policy used for reconnecting (100 ms … 10 s).
pub fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// A supervised broker connection with a pool of confirm-mode channels, each leased to one
/// publisher at a time (see [`ChannelLease`] for why channels are never shared).
///
/// Clone it freely; all clones share one connection. [`BrokerLink::lease`] answers
/// immediately with [`AmqpError::NotConnected`] while the link is down, which lets an HTTP
/// handler answer 503 at once instead of hanging.
#[derive(Clone)]
pub struct BrokerLink {
    inner: Arc<LinkInner>,
}

struct LinkInner {
    endpoint: AmqpEndpoint,
    /// The node the next connection tries first: after a node's connection is lost, the one
    /// after it (a dead node is not waited for first).
    next_node: std::sync::atomic::AtomicUsize,
    name: String,
    channels: usize,
    state: watch::Sender<Option<Arc<LinkState>>>,
    closed: Arc<Notify>,
    /// Why the link is down, for `/readyz`: the last connection failure or loss, without
    /// passwords. `None` before the first attempt has ended.
    down_because: std::sync::Mutex<Option<String>>,
}

type EventStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

struct LinkState {
    connection: Arc<Connection>,
    pool: Arc<ChannelPool>,
    /// The node's URL, password removed.
    node: String,
}

impl BrokerLink {
    /// Starts supervising a connection to `endpoint` (a URL converts), leasing at most `channels` confirm channels
    /// at once (publishers beyond that wait for one). Returns at once; the first connection
    /// is made in the background (see [`BrokerLink::wait_ready`]).
    pub fn start(
        endpoint: impl Into<AmqpEndpoint>,
        connection_name: &str,
        channels: usize,
    ) -> Self {
        let (state, _) = watch::channel(None);
        let link = Self {
            inner: Arc::new(LinkInner {
                endpoint: endpoint.into(),
                next_node: std::sync::atomic::AtomicUsize::new(0),
                name: connection_name.to_owned(),
                channels: channels.max(1),
                state,
                closed: Arc::new(Notify::new()),
                down_because: std::sync::Mutex::new(None),
            }),
        };
        tokio::spawn(link.clone().supervise());
        link
    }

    /// True while connected with the topology declared.
    pub fn is_ready(&self) -> bool {
        self.inner
            .state
            .borrow()
            .as_ref()
            .is_some_and(|s| s.connection.status().connected())
    }

    /// Why the link is not ready (`None` while it is): the last connection failure or loss,
    /// with the URL's password removed, for `/readyz`.
    pub fn down_reason(&self) -> Option<String> {
        if self.is_ready() {
            return None;
        }
        let last = self
            .inner
            .down_because
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let reason =
            last.unwrap_or_else(|| "not connected yet (first connection under way)".into());
        Some(crate::readiness::scrub_url_secrets(
            &reason,
            &self.inner.endpoint.url,
        ))
    }

    /// Records why the link is down (see [`BrokerLink::down_reason`]); `None` once connected.
    fn set_down_reason(&self, reason: Option<String>) {
        *self
            .inner
            .down_because
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }

    /// The node connected to (its URL without the password), while connected.
    pub fn connected_node(&self) -> Option<String> {
        self.inner.state.borrow().as_ref().map(|s| s.node.clone())
    }

    /// Waits until the link is ready, or `timeout` passes.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), AmqpError> {
        let mut rx = self.inner.state.subscribe();
        let wait = rx.wait_for(|s| s.is_some());
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(AmqpError::NotConnected),
        }
    }

    /// Waits until the link has noticed a lost connection, or `timeout` passes.
    pub async fn wait_down(&self, timeout: Duration) -> Result<(), AmqpError> {
        let mut rx = self.inner.state.subscribe();
        let wait = rx.wait_for(|s| s.is_none());
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(AmqpError::ConfirmTimeout(timeout)),
        }
    }

    /// Leases a confirm-mode channel for one batch of publishes, waiting at most `wait` for
    /// one to be free; `NotConnected` at once while the link is down.
    pub async fn lease(&self, wait: Duration) -> Result<ChannelLease, AmqpError> {
        let pool = {
            let guard = self.inner.state.borrow();
            let state = guard.as_ref().ok_or(AmqpError::NotConnected)?;
            if !state.connection.status().connected() {
                return Err(AmqpError::NotConnected);
            }
            state.pool.clone()
        };
        pool.lease(wait).await
    }

    /// Opens a new channel on the current connection (for consumers, which want their own).
    pub async fn open_channel(&self) -> Result<Channel, AmqpError> {
        let state = self
            .inner
            .state
            .borrow()
            .clone()
            .ok_or(AmqpError::NotConnected)?;
        Ok(state.connection.create_channel().await?)
    }

    /// Closes the connection cleanly (after in-flight confirms were awaited by callers).
    pub async fn close(&self) {
        let state = self.inner.state.send_replace(None);
        self.set_down_reason(Some("connection closed: the process is stopping".into()));
        if let Some(state) = state {
            state.pool.retire();
            state.pool.close_idle().await;
            let _ = state.connection.close(200, "shutdown".into()).await;
        }
    }

    async fn supervise(self) {
        let mut delays = reconnect_backoff();
        loop {
            if std::sync::Arc::strong_count(&self.inner) == 1 {
                return; // every user dropped the link
            }
            match self.open().await {
                Ok((state, mut events)) => {
                    delays = reconnect_backoff();
                    self.set_down_reason(None);
                    tracing::info!(connection = %self.inner.name, node = %state.node, "connected to RabbitMQ; topology declared");
                    self.inner.state.send_replace(Some(Arc::new(state)));
                    loop {
                        tokio::select! {
                            ev = events.next() => match ev {
                                Some(Event::Error(e)) => {
                                    self.set_down_reason(Some(format!("connection to {} lost: {e}; reconnecting", state_node(&self))));
                                    tracing::error!(error = %e, "RabbitMQ connection lost; reconnecting");
                                    break;
                                }
                                Some(Event::ConnectionBlocked(reason)) => {
                                    tracing::warn!(%reason, "RabbitMQ blocked this connection (resource alarm)");
                                }
                                Some(_) => {}
                                None => {
                                    self.set_down_reason(Some(format!("connection to {} ended; reconnecting", state_node(&self))));
                                    tracing::error!("RabbitMQ connection event stream ended; reconnecting");
                                    break;
                                }
                            },
                            () = self.inner.closed.notified() => {
                                self.set_down_reason(Some("a channel closed; reopening the connection".into()));
                                tracing::warn!("a RabbitMQ channel closed; reopening the connection");
                                break;
                            }
                        }
                    }
                    if let Some(old) = self.inner.state.send_replace(None) {
                        old.pool.retire();
                        let _ = old.connection.close(320, "reconnecting".into()).await;
                    }
                }
                Err(e) => {
                    self.set_down_reason(Some(format!("{e}; retrying with backoff")));
                    tracing::warn!(error = %e, "RabbitMQ not available; retrying");
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tokio::time::sleep(delay).await;
        }
    }

    async fn open(&self) -> Result<(LinkState, EventStream), AmqpError> {
        use std::sync::atomic::Ordering;
        let start = self.inner.next_node.load(Ordering::Relaxed);
        let (connection, node) =
            connect_from(&self.inner.endpoint, &self.inner.name, start).await?;
        // Whatever happens to this connection, the next one starts with the next node.
        self.inner.next_node.store(node + 1, Ordering::Relaxed);
        let node = nodes(&self.inner.endpoint.url)
            .get(node)
            .map(|n| redact_url(n))
            .unwrap_or_default();
        let events: EventStream = Box::pin(connection.events_listener());
        let connection = Arc::new(connection);
        let first = confirm_channel(&connection).await?;
        topology::declare(&first).await?;
        let pool = ChannelPool::new(
            connection.clone(),
            first,
            self.inner.channels,
            self.inner.closed.clone(),
        );
        Ok((
            LinkState {
                connection,
                pool: Arc::new(pool),
                node,
            },
            events,
        ))
    }
}

/// The node `link` is connected to (password removed), or `RabbitMQ` when unknown.
fn state_node(link: &BrokerLink) -> String {
    link.connected_node()
        .unwrap_or_else(|| "RabbitMQ".to_owned())
}

/// AMQP properties of a persistent message.
pub fn persistent_properties(message_id: &str, content_type: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(message_id))
        .with_content_type(ShortString::from(content_type))
}

/// Builds a header table from string pairs.
pub fn string_headers(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    t
}

/// Reads a string header (long or short string) from message properties.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Publishes one message and returns the pending confirmation, so callers can keep many
/// publishes in flight and await them together. `mandatory` makes an unroutable message come
/// back as a failure instead of vanishing (use it where a queue must be bound).
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, AmqpError> {
    Ok(channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await?)
}

/// Awaits a confirmation within `bound`: only an `Ack` counts as durable.
pub async fn await_confirm(
    confirm: lapin::PublisherConfirm,
    bound: Duration,
) -> Result<(), AmqpError> {
    match tokio::time::timeout(bound, confirm).await {
        Ok(Ok(lapin::Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(lapin::Confirmation::Ack(Some(_)))) => Err(AmqpError::Unroutable),
        Ok(Ok(_)) => Err(AmqpError::Nacked),
        Ok(Err(e)) => Err(AmqpError::Channel(e)),
        Err(_) => Err(AmqpError::ConfirmTimeout(bound)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
