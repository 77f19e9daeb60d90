//! One trace from the webhook request through the queue and the database to the Send API call
//! and the public event, observed with an in-memory span exporter.

use lc_shared::amqp::header_str;
use lc_shared::telemetry::{LogFormat, TraceParent, init_with_provider};
use lc_testkit::pipeline::{
    PAGE, TestEnv, WAIT, body, eventually, optin_item, optin_state, post_signed_traced,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use time::OffsetDateTime;

#[tokio::test]
async fn one_trace_spans_ingest_scheduler_send_api_and_the_public_event() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let telemetry =
        init_with_provider("loginconnect-test", LogFormat::Text, Some(provider.clone()));
    assert!(telemetry.tracing_enabled());

    let env = TestEnv::new().await;
    let events = env.capture_events(&["first_message.sent.#"]).await;
    let mut p = env.start_pipeline(env.scheduler_config()).await;

    // The caller (a proxy in front of ingest, say) already started a trace.
    let incoming = TraceParent::new_root();
    let payload = body(
        PAGE,
        vec![optin_item(PAGE, "TR1", OffsetDateTime::now_utc())],
    );
    let status = post_signed_traced(&p.ingest, payload, &incoming.to_string()).await;
    assert_eq!(status, 200);
    env.graph.wait_for_send_calls(1, WAIT).await.expect("sent");
    let sql = env.sql().await;
    eventually(WAIT, "opt-in recorded as sent", || async {
        optin_state(&sql, "TR1").await.as_deref() == Some("sent")
    })
    .await;

    // The public event carries the same trace.
    let got = env.deliveries(&events, 1, WAIT).await;
    assert_eq!(got.len(), 1);
    let header = header_str(&got[0].properties, "traceparent").expect("traceparent on the event");
    let event_trace = TraceParent::parse(&header).expect("valid traceparent");
    assert_eq!(event_trace.trace_id, incoming.trace_id);

    p.stop_scheduler().await;
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");
    let want = opentelemetry::trace::TraceId::from_bytes(incoming.trace_id);
    for name in ["webhook_delivery", "first_message", "send_api_call"] {
        let span = spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no span {name} among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
        assert_eq!(
            span.span_context.trace_id(),
            want,
            "span {name} is in the caller's trace"
        );
    }
    let delivery = spans
        .iter()
        .find(|s| s.name == "webhook_delivery")
        .expect("delivery span");
    assert_eq!(
        delivery.parent_span_id,
        opentelemetry::trace::SpanId::from_bytes(incoming.span_id),
        "ingest's span is a child of the caller's"
    );
    // Every attempt at the opt-in continues ingest's span. There can be more than one: a
    // claim whose slot passed while it waited (on a loaded machine) is given back without a
    // call and claimed again, and each claim gets its own `first_message` span.
    let attempts: Vec<_> = spans.iter().filter(|s| s.name == "first_message").collect();
    for attempt in &attempts {
        assert_eq!(
            attempt.parent_span_id,
            delivery.span_context.span_id(),
            "the scheduler's span continues ingest's span across the queue and the database"
        );
    }
    let calls: Vec<_> = spans.iter().filter(|s| s.name == "send_api_call").collect();
    assert_eq!(calls.len(), 1, "one Send API call");
    assert!(
        attempts
            .iter()
            .any(|a| a.span_context.span_id() == calls[0].parent_span_id),
        "the call nests in one of the scheduler's spans: call's parent {:?}, scheduler spans {:?}",
        calls[0].parent_span_id,
        attempts
            .iter()
            .map(|a| a.span_context.span_id())
            .collect::<Vec<_>>()
    );
}
