//! The actuator as Spring Boot users know it: the index, the probe groups, build
//! details, and log levels read by anyone and changed at run time by operators only.
//! Its own test binary, because the process's subscriber is installed once.

use std::sync::Arc;

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode},
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shared::{
    Problem,
    actuator::{Actuator, OperatorGate},
    telemetry::{LogSettings, init},
};
use tower::ServiceExt;

/// Operators present `Bearer operator`; anyone else is refused.
fn gate() -> OperatorGate {
    Arc::new(|headers: axum::http::HeaderMap| {
        let operator = headers
            .get("authorization")
            .is_some_and(|v| v == "Bearer operator");
        Box::pin(async move {
            if operator {
                Ok(())
            } else {
                Err(Problem::forbidden("operators only"))
            }
        })
    })
}

async fn call(
    app: &Router,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "svc.test:8080");
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            Body::from(body.to_string())
        }
        None => Body::empty(),
    };
    let response = app
        .clone()
        .oneshot(request.body(body).expect("request"))
        .await
        .expect("answer");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn the_actuator_speaks_spring_boot_and_operators_change_log_levels_at_run_time() {
    let _telemetry = init(
        "svc",
        &LogSettings {
            level: "info,noisy_dependency=warn".into(),
            ..LogSettings::default()
        },
        &Default::default(),
    );
    let app: Router = Actuator::new("svc", "1.2.3")
        .check("db", || async { Err("connection refused".to_owned()) })
        .operators(gate())
        .router();

    let (status, index) = call(&app, "GET", "/actuator", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        index["_links"]["loggers"]["href"],
        "http://svc.test:8080/actuator/loggers"
    );
    assert_eq!(index["_links"]["loggers-name"]["templated"], true);
    assert!(index["_links"]["health"].is_object() && index["_links"]["prometheus"].is_object());

    // Liveness does not depend on the database; readiness does.
    let (status, live) = call(&app, "GET", "/actuator/health/liveness", None, None).await;
    assert_eq!(
        (status, live["status"].as_str()),
        (StatusCode::OK, Some("UP"))
    );
    let (status, ready) = call(&app, "GET", "/actuator/health/readiness", None, None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["components"]["db"]["status"], "DOWN");

    let (_, info) = call(&app, "GET", "/actuator/info", None, None).await;
    assert_eq!(info["build"]["artifact"], "svc");
    assert_eq!(info["build"]["version"], "1.2.3");

    let (status, loggers) = call(&app, "GET", "/actuator/loggers", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        loggers["levels"]
            .as_array()
            .is_some_and(|l| l.contains(&json!("DEBUG")))
    );
    assert_eq!(loggers["loggers"]["ROOT"]["effectiveLevel"], "INFO");
    assert_eq!(
        loggers["loggers"]["noisy_dependency"]["configuredLevel"],
        "WARN"
    );

    // Nobody but an operator changes a level.
    let debug = json!({"configuredLevel": "DEBUG"});
    assert!(!tracing::enabled!(target: "checkout::pricing", tracing::Level::DEBUG));
    let (status, _) = call(
        &app,
        "POST",
        "/actuator/loggers/checkout",
        None,
        Some(debug.clone()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = call(
        &app,
        "POST",
        "/actuator/loggers/checkout",
        Some("Bearer operator"),
        Some(debug),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The new level applies to the logger and what lies below it, at once.
    assert!(tracing::enabled!(target: "checkout::pricing", tracing::Level::DEBUG));
    assert!(!tracing::enabled!(target: "elsewhere", tracing::Level::DEBUG));
    let (_, one) = call(
        &app,
        "GET",
        "/actuator/loggers/checkout::pricing",
        None,
        None,
    )
    .await;
    assert_eq!(
        one,
        json!({"configuredLevel": null, "effectiveLevel": "DEBUG"})
    );

    // null gives the logger back to its parent.
    let (status, _) = call(
        &app,
        "POST",
        "/actuator/loggers/checkout",
        Some("Bearer operator"),
        Some(json!({"configuredLevel": null})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!tracing::enabled!(target: "checkout::pricing", tracing::Level::DEBUG));

    // Bad input gets a 4xx that says what to fix.
    let (status, problem) = call(
        &app,
        "POST",
        "/actuator/loggers/checkout",
        Some("Bearer operator"),
        Some(json!({"configuredLevel": "LOUD"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["errors"][0]["field"], "configuredLevel");
    let (status, _) = call(&app, "GET", "/actuator/loggers/has%20space", None, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn requests_pools_and_the_process_are_measured_under_micrometer_names() {
    let routes = Router::new().route("/things/{id}", axum::routing::get(|| async { "a thing" }));
    let app = shared::http::with_problem_fallbacks(
        routes.merge(
            Actuator::new("svc", "1")
                .on_scrape(|| metrics::gauge!("scrape_hook_ran").set(1.0))
                .router(),
        ),
    );
    for path in ["/things/7", "/things/8", "/secret-admin-panel"] {
        call(&app, "GET", path, None, None).await;
    }
    // Invented methods cannot mint series either.
    call(&app, "BREW", "/things/9", None, None).await;
    let response = app
        .clone()
        .oneshot(
            Request::get("/actuator/prometheus")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("answer");
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .to_vec(),
    )
    .expect("utf-8");
    let series = |needle: &str| text.lines().any(|l| l.contains(needle));
    // One series per route template, with buckets, not one per path.
    let things = r#"http_server_requests_seconds_bucket{method="GET",uri="/things/{id}",status="200",outcome="SUCCESS""#;
    assert!(series(things), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with(
            r#"http_server_requests_seconds_count{method="GET",uri="/things/{id}",status="200""#
        ) && l.ends_with(" 2")),
        "{text}"
    );
    assert!(
        series(r#"uri="NOT_FOUND",status="404",outcome="CLIENT_ERROR""#),
        "{text}"
    );
    assert!(
        !text.contains("secret-admin-panel"),
        "paths never become labels"
    );
    assert!(
        !text.contains("BREW") && series(r#"method="OTHER""#),
        "{text}"
    );
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_files_open_files",
        "process_threads",
        "process_uptime_seconds",
    ] {
        assert!(series(process), "{process} missing:\n{text}");
    }
    assert!(series("scrape_hook_ran 1"), "{text}");
}

/// A level change reads its body only for an operator, and only a small one: whoever
/// has no credential is answered at once, whatever body it is still sending.
#[tokio::test]
async fn a_level_change_reads_no_body_before_the_credential_and_only_a_small_one() {
    let app = Actuator::new("svc", "1.0.0")
        .operators(gate())
        .router::<()>();
    // A body that never ends.
    use futures::StreamExt;
    let endless = futures::stream::once(async {
        Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"{\"configuredLevel\""))
    })
    .chain(futures::stream::pending());
    let request = Request::builder()
        .method("POST")
        .uri("/actuator/loggers/checkout")
        .header("content-type", "application/json")
        .header("content-length", "1000000")
        .body(Body::from_stream(endless))
        .expect("request");
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        app.clone().oneshot(request),
    )
    .await
    .expect("answered without waiting for the body")
    .expect("answer");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // An operator's oversized body is refused, saying what to send.
    let padding = "x".repeat(2000);
    let (status, problem) = call(
        &app,
        "POST",
        "/actuator/loggers/checkout",
        Some("Bearer operator"),
        Some(json!({"configuredLevel": "DEBUG", "padding": padding})),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("configuredLevel")),
        "{problem}"
    );
}
