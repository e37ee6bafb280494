//! The OpenAPI document: served at `/openapi.json` without a token, and the copy in
//! `docs/api/` is exactly what the code generates.

mod common;

use serde_json::Value;

#[tokio::test]
async fn the_document_is_served_and_docs_api_holds_the_same() {
    let s = common::spawn().await;
    let response = reqwest::get(format!("{}/openapi.json", s.base))
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    let served: Value = response.json().await.expect("json");
    assert_eq!(served["openapi"].as_str().map(|v| &v[..2]), Some("3."));
    for path in ["/orders", "/orders/{id}", "/orders/stats"] {
        assert!(served["paths"].get(path).is_some(), "{path} missing");
    }
    assert!(served["components"]["securitySchemes"]["bearer"].is_object());
    shared::openapi::check_document(
        &order_service::openapi::document(),
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api/order-service.json"),
    );
}
