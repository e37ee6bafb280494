//! Every log line written while a request is served names the request's trace and
//! request id, so one grep finds a request's whole story across the services.

use axum::{Router, body::Body, http::Request, routing::get};
use shared::testing::CapturedLog;
use tower::ServiceExt;
use tracing_subscriber::{Layer, prelude::*};

/// The process's layers as `telemetry::init` stacks them (spans, then JSON lines),
/// writing into `captured`, for the current thread only.
fn subscriber(captured: &CapturedLog) -> impl tracing::Subscriber + Send + Sync {
    let (_provider, spans) =
        shared::telemetry::span_layer("test", &Default::default()).expect("span layer");
    tracing_subscriber::registry().with(vec![
        spans,
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(captured.clone())
            .boxed(),
    ])
}

/// Serves one request to a route that logs a line and answers with the
/// `traceparent` its handler would send to the next hop; returns that line and value.
async fn serve(traceparent: Option<&str>) -> (serde_json::Value, String) {
    let captured = CapturedLog::default();
    let _guard = tracing::subscriber::set_default(subscriber(&captured));
    let routes = Router::new().route(
        "/orders/{id}",
        get(|| async {
            tracing::info!("looking the order up");
            shared::telemetry::traceparent_of(&tracing::Span::current()).unwrap_or_default()
        }),
    );
    let app = shared::http::with_problem_fallbacks(routes);
    let mut request = Request::get("/orders/42").header("x-request-id", "req-77");
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let answer = app
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("answer");
    let next_hop = axum::body::to_bytes(answer.into_body(), 1024)
        .await
        .expect("body");
    let text = captured.text();
    let line: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|l: &serde_json::Value| l["message"] == "looking the order up")
        .unwrap_or_else(|| panic!("no such line in:\n{text}"));
    (line, String::from_utf8(next_hop.to_vec()).expect("utf-8"))
}

#[tokio::test(flavor = "current_thread")]
async fn a_requests_log_lines_carry_its_trace_id_and_request_id() {
    let (line, _) = serve(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ))
    .await;
    assert_eq!(
        line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    assert_eq!(line["span"]["request_id"], "req-77", "{line}");
    assert_eq!(line["span"]["route"], "/orders/{id}", "{line}");
}

#[tokio::test(flavor = "current_thread")]
async fn the_next_hop_continues_the_callers_trace_from_a_span_of_this_service() {
    let (_, next_hop) = serve(Some(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ))
    .await;
    let parts: Vec<&str> = next_hop.split('-').collect();
    assert_eq!(parts.len(), 4, "{next_hop}");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736", "same trace");
    assert_ne!(parts[2], "00f067aa0ba902b7", "this service's own span");
    assert_eq!(parts[3], "01", "the caller's sampling decision is kept");
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_without_a_trace_starts_one_and_its_log_lines_name_it() {
    let (line, next_hop) = serve(None).await;
    let trace = line["span"]["trace_id"].as_str().unwrap_or_default();
    assert_eq!(trace.len(), 32, "{line}");
    assert_eq!(
        shared::telemetry::trace_id(&next_hop),
        Some(trace),
        "{next_hop}"
    );
}
