//! Logs, trace context and the Prometheus registry.
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `info`), human-readable unless
//! `LOG_FORMAT=json`. Trace context travels as a W3C `traceparent` string from the webhook
//! request through the AMQP header, the database rows and the public event.

use std::fmt;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The process's telemetry; call [`Telemetry::shutdown`] at exit to flush pending spans.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported (OTLP configured, or a test provider installed).
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes and stops the span exporter. It blocks, so call it off the async runtime
    /// (e.g. after `run` returned, or in `spawn_blocking`).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            let _ = p.shutdown();
        }
    }
}

/// Installs logging and, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific variable)
/// is set, OTLP/HTTP span export configured by the standard `OTEL_*` variables. Without it
/// no OpenTelemetry layer is installed at all, so tracing costs nothing.
pub fn init(service: &str, format: LogFormat) -> Telemetry {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()));
    let provider = if configured {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service.to_owned())
                            .build(),
                    )
                    .build(),
            ),
            Err(e) => {
                eprintln!("OpenTelemetry export disabled: cannot build the OTLP exporter: {e}");
                None
            }
        }
    } else {
        None
    };
    init_with_provider(service, format, provider)
}

/// Installs logging with an explicit span provider (tests pass one with an in-memory
/// exporter). Safe to call more than once: later calls do nothing.
pub fn init_with_provider(
    service: &str,
    format: LogFormat,
    provider: Option<SdkTracerProvider>,
) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let otel_layer = provider.as_ref().map(|p| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_owned()))
    });
    // An already installed subscriber (several services in one test process) is fine.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init();
    Telemetry { provider }
}

/// Installs logging only (no span export), e.g. for the CLI.
pub fn init_logging(format: LogFormat) {
    let _ = init_with_provider("loginconnect", format, None);
}

/// Makes `span` a child of the context that came with the work (`parent`, from a request
/// header, an AMQP header or a database row) and returns the context to pass on.
///
/// With span export on, the returned context is the span's own (so the next hop nests under
/// it); without it, a child of `parent` (or a new root), so the trace id still travels.
pub fn continue_trace(span: &tracing::Span, parent: Option<&TraceParent>) -> TraceParent {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let Some(p) = parent {
        let remote = SpanContext::new(
            TraceId::from_bytes(p.trace_id),
            SpanId::from_bytes(p.span_id),
            TraceFlags::new(p.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    if own.is_valid() {
        TraceParent {
            trace_id: own.trace_id().to_bytes(),
            span_id: own.span_id().to_bytes(),
            flags: own.trace_flags().to_u8(),
        }
    } else {
        parent.map_or_else(TraceParent::new_root, TraceParent::child)
    }
}

/// A W3C trace context (`traceparent` header value, version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id.
    pub trace_id: [u8; 16],
    /// 8-byte id of the parent span.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0 = sampled).
    pub flags: u8,
}

impl TraceParent {
    /// A new root context with random ids.
    pub fn new_root() -> Self {
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        fill_nonzero(&mut trace_id);
        fill_nonzero(&mut span_id);
        Self {
            trace_id,
            span_id,
            flags: 1,
        }
    }

    /// A child context: same trace, new span id.
    pub fn child(&self) -> Self {
        let mut span_id = [0u8; 8];
        fill_nonzero(&mut span_id);
        Self { span_id, ..*self }
    }

    /// Parses a `traceparent` value; `None` if it is not valid version-00 syntax.
    pub fn parse(value: &str) -> Option<Self> {
        let parts: Vec<&str> = value.trim().split('-').collect();
        let [version, trace, span, flags] = parts.as_slice() else {
            return None;
        };
        if *version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id as 32 lowercase hex characters (what logs carry).
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

fn fill_nonzero(buf: &mut [u8]) {
    loop {
        for b in buf.iter_mut() {
            *b = fastrand::u8(..);
        }
        if buf.iter().any(|b| *b != 0) {
            return;
        }
    }
}

/// A short, non-reversible label of a login_id for log lines (the raw id identifies a person).
pub fn login_id_label(login_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(login_id.as_bytes());
    hex::encode(&digest[..6])
}

/// Renders a Prometheus registry in the text exposition format.
pub fn render_metrics(registry: &prometheus::Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if encoder.encode(&registry.gather(), &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_children_keep_the_trace() {
        let root = TraceParent::new_root();
        let text = root.to_string();
        assert_eq!(TraceParent::parse(&text), Some(root));
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_eq!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .map(|t| t.trace_id_hex()),
            Some("4bf92f3577b34da6a3ce929d0e0e4736".to_owned())
        );
        assert_eq!(TraceParent::parse("garbage"), None);
        assert_eq!(
            TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
    }

    #[test]
    fn login_id_label_is_short_and_stable() {
        assert_eq!(login_id_label("abc"), login_id_label("abc"));
        assert_eq!(login_id_label("abc").len(), 12);
        assert_ne!(login_id_label("abc"), login_id_label("abd"));
    }
}
