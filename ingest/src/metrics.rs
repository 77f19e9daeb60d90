//! Prometheus metrics of the ingest service.
//!
//! Every label takes its values from a fixed set, never from the request: a label copied
//! from input (an HTTP extension method, a path) would let anyone create a series per request.

use axum::http::Method;
use lc_shared::topology;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::transport::ConnectionMetrics;

/// The method label of a request: one of the methods HTTP defines, else `OTHER`.
pub fn method_label(method: &Method) -> &'static str {
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::POST, "POST"),
        (Method::HEAD, "HEAD"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::PATCH, "PATCH"),
        (Method::TRACE, "TRACE"),
        (Method::CONNECT, "CONNECT"),
    ];
    KNOWN
        .iter()
        .find(|(m, _)| m == method)
        .map_or("OTHER", |(_, label)| label)
}

/// Every metric ingest exports, registered in one registry served on `/metrics`.
#[derive(Clone)]
pub struct IngestMetrics {
    /// The registry behind `/metrics`.
    pub registry: Registry,
    /// HTTP requests by route and status code.
    pub requests: IntCounterVec,
    /// Refused webhook signatures by reason.
    pub signature_failures: IntCounterVec,
    /// Events published (and confirmed) by kind.
    pub events_published: IntCounterVec,
    /// Time from the first publish of a body to the last confirm.
    pub confirm_latency: Histogram,
    /// Signed bodies that did not parse and went to `messenger.unparsed`.
    pub unparsed_bodies: IntCounter,
    /// Single entries or events set aside on `messenger.unparsed` from a body whose other
    /// events were published.
    pub unparsed_parts: IntCounter,
    /// Messages and bytes ingest put on the bounded inspection queues, by queue: with the
    /// queues' bounds and depths, what the broker dropped (oldest first) beyond them.
    pub inspection_messages: IntCounterVec,
    /// Body bytes of [`Self::inspection_messages`], by queue.
    pub inspection_bytes: IntCounterVec,
    /// Signed bodies refused with 400 because they are not a JSON object.
    pub not_json_object: IntCounter,
    /// Open connections and connections shed at the cap.
    pub connections: ConnectionMetrics,
    /// Bodies answered 503 because the broker was down, slow or refused them.
    pub broker_failures: IntCounter,
    /// 1 while connected to the broker with the topology declared.
    pub broker_ready: IntGauge,
    /// App binding: entries refused, registry reads.
    pub bindings: crate::binding::watch::BindingMetrics,
}

impl IngestMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ingest_http_requests_total",
                "HTTP requests by route (method and path) and status",
            ),
            &["route", "status"],
        )?;
        let signature_failures = IntCounterVec::new(
            Opts::new(
                "ingest_signature_failures_total",
                "Webhook deliveries refused for their signature, by reason",
            ),
            &["reason"],
        )?;
        let events_published = IntCounterVec::new(
            Opts::new(
                "ingest_events_published_total",
                "Webhook events published and confirmed by the broker, by kind",
            ),
            &["kind"],
        )?;
        let confirm_latency = Histogram::with_opts(
            HistogramOpts::new(
                "ingest_confirm_latency_seconds",
                "Time from publishing a body's events to the broker's last confirm",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let unparsed_bodies = IntCounter::new(
            "ingest_unparsed_bodies_total",
            "Signed bodies that could not be parsed and were kept on messenger.unparsed",
        )?;
        let broker_failures = IntCounter::new(
            "ingest_broker_failures_total",
            "Deliveries answered 503 because the broker was down, slow or refused them",
        )?;
        let unparsed_parts = IntCounter::new(
            "ingest_unparsed_parts_total",
            "Single entries or events of a body set aside on messenger.unparsed (the rest of \
             the body was published)",
        )?;
        let inspection_messages = IntCounterVec::new(
            Opts::new(
                "ingest_inspection_messages_total",
                "Messages put on the bounded inspection queues, by queue",
            ),
            &["queue"],
        )?;
        let inspection_bytes = IntCounterVec::new(
            Opts::new(
                "ingest_inspection_bytes_total",
                "Body bytes put on the bounded inspection queues, by queue",
            ),
            &["queue"],
        )?;
        let not_json_object = IntCounter::new(
            "ingest_not_json_object_total",
            "Signed webhook bodies refused with 400 because they are not a JSON object (an \
             app secret's MAC made for another context, e.g. a Login signed_request)",
        )?;
        let connections = ConnectionMetrics {
            open: IntGauge::new("ingest_open_connections", "HTTP connections open now")?,
            shed: IntCounter::new(
                "ingest_connections_shed_total",
                "Connections answered 503 and closed because INGEST_MAX_CONNECTIONS were open",
            )?,
        };
        for queue in [topology::UNPARSED_QUEUE, topology::OTHER_QUEUE] {
            inspection_messages.with_label_values(&[queue]);
            inspection_bytes.with_label_values(&[queue]);
        }
        let broker_ready = IntGauge::new(
            "ingest_broker_ready",
            "1 while connected to RabbitMQ with the topology declared",
        )?;
        for reason in ["missing", "wrong_prefix", "malformed", "mismatch"] {
            signature_failures.with_label_values(&[reason]);
        }
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(signature_failures.clone()))?;
        registry.register(Box::new(events_published.clone()))?;
        registry.register(Box::new(confirm_latency.clone()))?;
        registry.register(Box::new(unparsed_bodies.clone()))?;
        registry.register(Box::new(broker_failures.clone()))?;
        registry.register(Box::new(broker_ready.clone()))?;
        registry.register(Box::new(unparsed_parts.clone()))?;
        registry.register(Box::new(inspection_messages.clone()))?;
        registry.register(Box::new(inspection_bytes.clone()))?;
        registry.register(Box::new(not_json_object.clone()))?;
        registry.register(Box::new(connections.open.clone()))?;
        registry.register(Box::new(connections.shed.clone()))?;
        let bindings = crate::binding::watch::BindingMetrics::new(&registry)?;
        Ok(Self {
            registry,
            requests,
            signature_failures,
            events_published,
            confirm_latency,
            unparsed_bodies,
            unparsed_parts,
            inspection_messages,
            inspection_bytes,
            not_json_object,
            connections,
            broker_failures,
            broker_ready,
            bindings,
        })
    }
}
