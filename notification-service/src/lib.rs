//! notification-service: sends an email per payment outcome and keeps the history.
//!
//! [`Application::build`] binds the listener and prepares the database pool;
//! [`Application::run_until_stopped`] serves until the shutdown token fires. Tests
//! build it with port 0 and drive it over a real socket.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use serde::{Deserialize, Serialize};
use shared::{
    actuator::Actuator,
    auth::{JwtVerifier, ServiceAuthSettings},
    config::{DatabaseSettings, HttpSettings, Layers},
    kafka::KafkaSettings,
    registry::RegistrySettings,
    telemetry::LogSettings,
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The canonical service name, as registered.
pub const SERVICE_NAME: &str = "notification-service";

/// The PostgreSQL schema notification-service owns (its tables arrive with its features).
pub const SCHEMA: &str = "notifications";

/// Everything notification-service reads at start-up; env prefix `NOTIFICATION_`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub http: HttpSettings,
    pub log: LogSettings,
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub registry: RegistrySettings,
    pub auth: ServiceAuthSettings,
}

impl Settings {
    /// Defaults, then `NOTIFICATION_CONFIG`'s file, then `DATABASE_URL` / `KAFKA_BROKERS`,
    /// `REGISTRY_URL` / `REGISTRY_TOKEN` / `GATEWAY_URL`, then `NOTIFICATION_*` variables.
    pub fn load() -> Result<Self, shared::config::ConfigError> {
        Layers::new("NOTIFICATION_")
            .fallback_env("DATABASE_URL", "database.url")
            .fallback_env("KAFKA_BROKERS", "kafka.brokers")
            .registry_client()
            .gateway_tokens()
            .load()
    }
}

/// A bound, ready-to-run notification-service.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    registry: RegistrySettings,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = shared::db::connect_lazy(&settings.database, SCHEMA)
            .context("database.url is not a valid PostgreSQL URL")?;
        let listener = settings.http.bind().await?;
        let verifier = settings
            .auth
            .verifier()
            .map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        let router = router(pool, std::sync::Arc::new(verifier));
        Ok(Self {
            listener,
            router,
            registry: settings.registry,
        })
    }

    /// The address really bound (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(service = SERVICE_NAME, addr = %self.local_addr(), "listening");
        shared::registry::serve_registered(
            SERVICE_NAME,
            self.listener,
            self.router,
            &self.registry,
            shutdown,
        )
        .await?;
        Ok(())
    }
}

/// The HTTP routes of notification-service: the actuator, and the API behind token verification.
pub fn router(pool: PgPool, verifier: std::sync::Arc<JwtVerifier>) -> Router {
    let actuator = Actuator::new(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .check("db", move || shared::db::check(pool.clone()));
    shared::http::service_router(actuator.router(), Router::new(), verifier)
}
