//! order-service started in-process on port 0, as every service test starts it.

use order_service::{Application, Settings};
use shared::{
    config::{DatabaseSettings, HttpSettings},
    registry::RegistrySettings,
};
use tokio_util::sync::CancellationToken;

async fn spawn(database_url: String) -> (String, CancellationToken) {
    let settings = Settings {
        http: HttpSettings::local(0),
        database: DatabaseSettings {
            url: database_url,
            max_connections: 2,
            migrate: false,
        },
        // Alone in this test: no registry to join.
        registry: RegistrySettings {
            enabled: false,
            ..RegistrySettings::default()
        },
        ..Settings::default()
    };
    let app = Application::build(settings).await.expect("builds");
    let base = format!("http://{}", app.local_addr());
    let shutdown = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(shutdown.clone()));
    (base, shutdown)
}

#[tokio::test]
async fn health_reports_the_database() {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL names the test database; run the tests with `cargo xtask test`");
    let (base, shutdown) = spawn(url).await;
    let response = reqwest::get(format!("{base}/actuator/health"))
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["status"], "UP");
    assert_eq!(body["components"]["db"]["status"], "UP");
    shutdown.cancel();
}

#[tokio::test]
async fn health_is_down_with_503_when_the_database_is_unreachable() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let (base, shutdown) = spawn(format!("postgres://app:secret@{dead}/orders")).await;
    let response = reqwest::get(format!("{base}/actuator/health"))
        .await
        .expect("answers");
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["status"], "DOWN");
    assert_eq!(body["components"]["db"]["status"], "DOWN");
    let reason = body["components"]["db"]["details"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(
        !reason.contains("secret"),
        "no credentials in health: {reason}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_scrape_shows_the_pool_and_the_requests_under_spring_names() {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL names the test database; run the tests with `cargo xtask test`");
    let (base, shutdown) = spawn(url).await;
    // A request that reaches a route template, and one the database answers.
    reqwest::get(format!("{base}/actuator/health"))
        .await
        .expect("answers");
    let text = reqwest::get(format!("{base}/actuator/prometheus"))
        .await
        .expect("answers")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains(r#"hikaricp_connections_max{pool="main"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"hikaricp_connections_idle{pool="main"}"#),
        "{text}"
    );
    assert!(
        text.contains(r#"http_server_requests_seconds_bucket{method="GET",uri="/actuator/health",status="200""#),
        "{text}"
    );
    shutdown.cancel();
}
