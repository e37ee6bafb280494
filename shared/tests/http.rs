//! The contract's error behaviour on a router built the way every service builds one.

use axum::{
    Router,
    body::Body,
    http::{Request, StatusCode, header},
    routing::post,
};
use http_body_util::BodyExt;
use serde::Deserialize;
use shared::{Problem, http::Json};
use tower::ServiceExt;

#[derive(Debug, Deserialize)]
struct Deposit {
    amount: i64,
}

fn app() -> Router {
    let routes = Router::new().route(
        "/deposits",
        post(|Json(d): Json<Deposit>| async move { d.amount.to_string() }),
    );
    shared::http::with_problem_fallbacks(routes)
}

async fn call(request: Request<Body>) -> (StatusCode, Option<String>, Option<String>, Problem) {
    let response = app().oneshot(request).await.expect("infallible");
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let allow = response
        .headers()
        .get(header::ALLOW)
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem = serde_json::from_slice(&bytes).expect("a problem body");
    (status, content_type, allow, problem)
}

fn post_json(body: &'static str) -> Request<Body> {
    Request::post("/deposits")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("request")
}

#[tokio::test]
async fn unknown_path_is_a_problem_404() {
    let (status, content_type, _, problem) = call(
        Request::get("/nowhere")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(problem.status, 404);
    assert!(problem.detail.contains("/nowhere"));
}

#[tokio::test]
async fn wrong_method_is_a_problem_405_with_allow() {
    let (status, content_type, allow, problem) = call(
        Request::get("/deposits")
            .body(Body::empty())
            .expect("request"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(allow.as_deref(), Some("POST"));
    assert_eq!(problem.status, 405);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let request = Request::post("/deposits")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from("amount=5"))
        .expect("request");
    let (status, _, _, problem) = call(request).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(problem.detail.contains("application/json"));
}

#[tokio::test]
async fn a_wrong_type_names_the_field_with_422() {
    let (status, content_type, _, problem) = call(post_json(r#"{"amount": "lots"}"#)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    assert_eq!(problem.errors[0].field, "amount");
}

#[tokio::test]
async fn malformed_json_is_400() {
    let (status, _, _, problem) = call(post_json(r#"{"amount": 5"#)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem.detail.contains("not valid JSON"));
}

/// A service router (as the service shell builds it) whose open part has a route
/// that takes `slow` to answer, under a `limit` per request.
fn service(slow: std::time::Duration, limit: std::time::Duration) -> Router {
    let open = Router::new().route(
        "/slow",
        axum::routing::get(move || async move {
            tokio::time::sleep(slow).await;
            "done"
        })
        .post(move || async move {
            tokio::time::sleep(slow).await;
            "done"
        }),
    );
    let verifier = shared::auth::JwtVerifier::new(&Default::default()).expect("verifier");
    shared::http::service_router(open, Router::new(), std::sync::Arc::new(verifier), limit)
}

#[tokio::test]
async fn a_request_over_the_time_limit_is_answered_503_with_a_problem() {
    use std::time::Duration;
    let response = service(Duration::from_secs(30), Duration::from_millis(50))
        .oneshot(Request::get("/slow").body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem: Problem = serde_json::from_slice(&bytes).expect("a problem body");
    assert!(problem.detail.contains("longer than 50 ms"), "{problem:?}");

    // A write without an Idempotency-Key is not told to retry: it may have happened.
    let write = service(Duration::from_secs(30), Duration::from_millis(50))
        .oneshot(Request::post("/slow").body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(write.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(write.headers().get(header::RETRY_AFTER).is_none());
    let bytes = write.into_body().collect().await.expect("body").to_bytes();
    let problem: Problem = serde_json::from_slice(&bytes).expect("a problem body");
    assert!(problem.detail.contains("unknown"), "{problem:?}");

    let quick = service(Duration::ZERO, Duration::from_secs(5))
        .oneshot(Request::get("/slow").body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    assert_eq!(quick.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_request_id_is_the_callers_or_a_new_one_and_is_answered() {
    use std::time::Duration;
    let app = service(Duration::ZERO, Duration::from_secs(5));
    let kept = app
        .clone()
        .oneshot(
            Request::get("/slow")
                .header("x-request-id", "req-42")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(kept.headers()["x-request-id"], "req-42");
    for sent in [None, Some("has space")] {
        let mut request = Request::get("/slow");
        if let Some(id) = sent {
            request = request.header("x-request-id", id);
        }
        let made = app
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let id = made.headers()["x-request-id"].to_str().expect("text");
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    }
}
