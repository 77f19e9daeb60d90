//! A downstream service of loginconnect, as small as it can be while doing everything a real
//! one must: it declares its **own** durable quorum queue, binds it to `loginconnect.events`
//! for the event kind it wants (`identity.linked`) on every page or only on its own pages
//! (routing keys are `<kind>.<page_id>`), dedupes on the CloudEvent `id` (delivery is
//! at-least-once), ignores an event older than one already handled for the same person
//! (`personseq`) or page (`pageseq`, operational events), prints each event as one line and
//! acks only after that.
//!
//! ```text
//! cargo run -p loginconnect-worker --example downstream_consumer -- --queue crm.identity-links
//! # one client's pages only, every kind of event (public and operational):
//! cargo run -p loginconnect-worker --example downstream_consumer -- \
//!     --queue client-a.events --kind '*.*' --page 106283175398765 --page 206283175398765
//! ```
//!
//! Bind the queue before you need its events: loginconnect publishes without `mandatory`, so
//! events published while no queue is bound are dropped by the broker.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use lapin::ExchangeKind;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lc_shared::amqp::{AmqpEndpoint, AmqpError};
use lc_shared::config::AmqpArgs;
use lc_shared::events::{CloudEvent, IdentityLinked};
use lc_shared::topology::EVENTS_EXCHANGE;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// Prints the events loginconnect announces (identity links by default).
#[derive(Debug, Parser)]
#[command(
    name = "downstream_consumer",
    version,
    about = "Prints the events loginconnect announces, identity links by default (an example downstream service)."
)]
struct Args {
    /// RabbitMQ URL and TLS files, as loginconnect's own (`AMQP_URL`, `AMQP_TLS_*`).
    #[command(flatten)]
    amqp: AmqpArgs,

    /// This service's own queue (declared durable, quorum).
    #[arg(long, default_value = "crm.identity-links")]
    queue: String,

    /// Event kind to bind (`identity.linked`; `first_message.*` for a family, `*.*` for
    /// every kind, operational events included).
    #[arg(long, default_value = "identity.linked")]
    kind: String,

    /// Bind only this page's events (repeat for several pages); every page's when absent.
    #[arg(long = "page")]
    pages: Vec<String>,

    /// Event ids remembered for dedupe (the oldest are forgotten first).
    #[arg(long = "dedupe-capacity", default_value_t = 100_000)]
    dedupe_capacity: usize,

    /// Unacked deliveries the broker may push ahead.
    #[arg(long, default_value_t = 50)]
    prefetch: u16,
}

impl Args {
    /// The binding keys: `<kind>.<page_id>` per page, or `<kind>.#` for every page (which
    /// also matches the page-less keys of loginconnect before 2.0, during a migration).
    fn binding_keys(&self) -> Vec<String> {
        if self.pages.is_empty() {
            vec![format!("{}.#", self.kind)]
        } else {
            self.pages
                .iter()
                .map(|page| format!("{}.{page}", self.kind))
                .collect()
        }
    }
}

/// The highest `personseq` handled per person and `pageseq` per page, so a redelivered or
/// requeued older event never undoes a newer one (in memory for the example; a real service
/// keeps it with the data it updates).
#[derive(Default)]
struct Order {
    people: HashMap<(String, String), i64>,
    pages: HashMap<String, i64>,
}

impl Order {
    /// True if `event` is newer than what was handled for its person or page (or carries
    /// no number: events written before the numbers existed).
    fn is_newer(&mut self, event: &CloudEvent) -> bool {
        let page = || {
            event.data["page_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let (last, seq) = match (event.personseq, event.pageseq) {
            (Some(seq), _) => {
                let login = event.data["login_id"].as_str().unwrap_or_default();
                (
                    self.people.entry((page(), login.to_owned())).or_default(),
                    seq,
                )
            }
            (None, Some(seq)) => (self.pages.entry(page()).or_default(), seq),
            (None, None) => return true,
        };
        if seq <= *last {
            return false;
        }
        *last = seq;
        true
    }
}

/// Remembers the last `capacity` event ids.
///
/// In memory only for the example: a real service dedupes in its own store, in the same
/// transaction as the write the event causes (e.g. a `processed_events(id)` table with a
/// unique key), so a restart or a second replica does not apply an event twice.
struct Seen {
    capacity: usize,
    ids: HashSet<Uuid>,
    order: VecDeque<Uuid>,
}

impl Seen {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            ids: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// True the first time an id is seen.
    fn first_time(&mut self, id: Uuid) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // A TLS file that cannot be used is a configuration error: stop instead of retrying.
    let endpoint = args.amqp.endpoint()?;
    let mut seen = Seen::new(args.dedupe_capacity);
    let mut order = Order::default();
    let mut delay = Duration::from_millis(200);
    loop {
        tokio::select! {
            result = consume(&args, &endpoint, &mut seen, &mut order) => match result {
                Ok(()) => eprintln!("the broker closed the consumer; reconnecting"),
                Err(e) => eprintln!("connection problem: {e}; reconnecting in {delay:?}"),
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        // What was unacked when the connection dropped is redelivered; `seen` skips repeats.
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Consumes until the connection or channel fails.
async fn consume(
    args: &Args,
    endpoint: &AmqpEndpoint,
    seen: &mut Seen,
    order: &mut Order,
) -> Result<(), AmqpError> {
    let conn = lc_shared::amqp::connect(endpoint, "downstream_consumer").await?;
    let ch = conn.create_channel().await?;
    // Declaring the exchange too (same flags as loginconnect) lets this start first.
    ch.exchange_declare(
        EVENTS_EXCHANGE.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut queue_args = FieldTable::default();
    queue_args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    ch.queue_declare(
        args.queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        queue_args,
    )
    .await?;
    let keys = args.binding_keys();
    for key in &keys {
        ch.queue_bind(
            args.queue.as_str().into(),
            EVENTS_EXCHANGE.into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    ch.basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = ch
        .basic_consume(
            args.queue.as_str().into(),
            "downstream-example".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    eprintln!(
        "consuming {} (bound to {EVENTS_EXCHANGE} with {})",
        args.queue,
        keys.join(", ")
    );
    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery?;
        let event: CloudEvent = match serde_json::from_slice(&delivery.data) {
            Ok(event) => event,
            Err(e) => {
                // Not something this version understands; a real service would dead-letter
                // it (a queue with x-dead-letter-exchange) and alert, not drop it.
                eprintln!("rejecting a message that is not a CloudEvent: {e}");
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
                continue;
            }
        };
        if !seen.first_time(event.id) {
            eprintln!("duplicate {} ignored", event.id);
            delivery.acker.ack(BasicAckOptions::default()).await?;
            continue;
        }
        if !order.is_newer(&event) {
            // A redelivery or requeue of an event older than one already handled.
            eprintln!("older event {} ignored (a newer one was handled)", event.id);
            delivery.acker.ack(BasicAckOptions::default()).await?;
            continue;
        }
        println!("{}", describe(&event));
        // Acked only once handled: a crash before this line means a redelivery, not a loss.
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    Ok(())
}

/// One line per event: the link's fields for `identity.linked`, the type and id otherwise.
fn describe(event: &CloudEvent) -> String {
    let fmt = |t: time::OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    match serde_json::from_value::<IdentityLinked>(event.data.clone()) {
        Ok(link) if event.event_type == "com.loginconnect.identity.linked" => format!(
            "linked page_id={} login_id={} psid={} linked_at={} opted_in_at={} first_reply_mid={} event_id={}",
            link.page_id,
            link.login_id,
            link.psid,
            fmt(link.linked_at),
            link.opted_in_at.map_or_else(|| "-".to_owned(), fmt),
            link.first_reply_mid.as_deref().unwrap_or("-"),
            event.id,
        ),
        _ => format!(
            "{} page_id={} app_id={} event_id={} data={}",
            event.event_type,
            event.pageid.as_deref().unwrap_or("-"),
            event.appid.as_deref().unwrap_or("-"),
            event.id,
            event.data
        ),
    }
}
