//! Every log line written while a request is served names the request's trace and
//! request id, so one grep finds a request's whole story across the services.

use std::sync::{Arc, Mutex};

use axum::{Router, body::Body, http::Request, routing::get};
use tower::ServiceExt;
use tracing_subscriber::{fmt::MakeWriter, prelude::*};

/// A writer into a shared buffer, for reading the log lines back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_requests_log_lines_carry_its_trace_id_and_request_id() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(captured.clone()),
    );
    let _guard = tracing::subscriber::set_default(subscriber);

    let routes = Router::new().route(
        "/orders/{id}",
        get(|| async {
            tracing::info!("looking the order up");
            "ok"
        }),
    );
    let app = shared::http::with_problem_fallbacks(routes);
    app.oneshot(
        Request::get("/orders/42")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("x-request-id", "req-77")
            .body(Body::empty())
            .expect("request"),
    )
    .await
    .expect("answer");

    let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    let line: serde_json::Value = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .find(|l: &serde_json::Value| l["message"] == "looking the order up")
        .unwrap_or_else(|| panic!("no such line in:\n{text}"));
    assert_eq!(
        line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{line}"
    );
    assert_eq!(line["span"]["request_id"], "req-77", "{line}");
    assert_eq!(line["span"]["route"], "/orders/{id}", "{line}");
}
