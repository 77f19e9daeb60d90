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
    let first = spans
        .iter()
        .find(|s| s.name == "first_message")
        .expect("first_message span");
    assert_eq!(
        first.parent_span_id,
        delivery.span_context.span_id(),
        "the scheduler's span continues ingest's span across the queue and the database"
    );
    let call = spans
        .iter()
        .find(|s| s.name == "send_api_call")
        .expect("call span");
    assert_eq!(
        call.parent_span_id,
        first.span_context.span_id(),
        "the call nests in the scheduler's span"
    );
}
