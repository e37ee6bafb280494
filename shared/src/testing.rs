//! Helpers for the services' integration tests (feature `testing`): a fresh database
//! per test, and a stand-in for the gateway's JWKS endpoint.

use std::sync::Arc;

use sqlx::{Connection, PgConnection};

use crate::auth::TokenSigner;

/// Creates an empty database next to the one `DATABASE_URL` names (set by
/// `cargo xtask test`) and returns its URL, so each test starts from nothing.
pub async fn fresh_database() -> String {
    let url = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL names the test database; run the tests with `cargo xtask test`");
    let name = format!("test_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&url)
        .await
        .expect("connect to DATABASE_URL");
    sqlx::raw_sql(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create a test database");
    let (base, _) = url.rsplit_once('/').expect("a database URL");
    format!("{base}/{name}")
}

/// Serves `signer`'s JWKS at `/.well-known/jwks.json` on a free port, as the gateway
/// does; returns the base URL to use as `auth.gateway_url`.
pub async fn gateway_jwks(signer: Arc<TokenSigner>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let signer = signer.clone();
            async move { axum::Json(signer.jwks()) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}
