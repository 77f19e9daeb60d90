//! Prometheus metrics of the ingest service.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

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
    /// Bodies answered 503 because the broker was down, slow or refused them.
    pub broker_failures: IntCounter,
    /// 1 while connected to the broker with the topology declared.
    pub broker_ready: IntGauge,
}

impl IngestMetrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "ingest_http_requests_total",
                "HTTP requests by route and status",
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
        Ok(Self {
            registry,
            requests,
            signature_failures,
            events_published,
            confirm_latency,
            unparsed_bodies,
            broker_failures,
            broker_ready,
        })
    }
}
