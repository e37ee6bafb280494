//! notification-service: one email per order outcome, sent over SMTP with retry, and
//! the history of every notification.
//!
//! [`Application::build`] applies the migrations, binds the listener and prepares the
//! consumer of payment results and the mailer; [`Application::run_until_stopped`] serves until the
//! shutdown token fires. Tests build it with port 0 and drive it over a real socket.

pub mod api;
pub mod mail;
pub mod openapi;
pub mod queue;

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use shared::{
    actuator::Actuator,
    auth::{JwtVerifier, ServiceAuthSettings},
    config::{DatabaseSettings, HttpSettings, Layers},
    consumer::{ConsumerLoopSettings, EventConsumer},
    events::Topics,
    kafka::KafkaSettings,
    registry::RegistrySettings,
    telemetry::LogSettings,
};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    mail::{MailSettings, Mailer},
    queue::Queuer,
};

/// The canonical service name, as registered; also the default consumer group.
pub const SERVICE_NAME: &str = "notification-service";

/// The PostgreSQL schema notification-service owns.
pub const SCHEMA: &str = "notifications";

/// The migrations of [`SCHEMA`], compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Everything notification-service reads at start-up; env prefix `NOTIFICATION_`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub http: HttpSettings,
    pub log: LogSettings,
    pub tracing: shared::telemetry::TracingSettings,
    pub database: DatabaseSettings,
    pub kafka: KafkaSettings,
    pub topics: Topics,
    pub registry: RegistrySettings,
    pub auth: ServiceAuthSettings,
    pub consumer: ConsumerLoopSettings,
    pub mail: MailSettings,
}

impl Settings {
    /// Defaults, then `NOTIFICATION_CONFIG`'s file, then `DATABASE_URL` /
    /// `KAFKA_BROKERS`, `REGISTRY_URL` / `REGISTRY_TOKEN` / `GATEWAY_URL`, then
    /// `NOTIFICATION_*` variables.
    pub fn load() -> Result<Self, shared::config::ConfigError> {
        Layers::new("NOTIFICATION_")
            .spans()
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
    http_limits: shared::config::ConnectionLimits,
    mailer: Option<Mailer>,
    consumer: Option<EventConsumer<Queuer>>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = shared::db::connect_lazy(&settings.database, SCHEMA)
            .context("database.url is not a valid PostgreSQL URL")?;
        if settings.database.migrate {
            shared::db::migrate(&pool, SCHEMA, &MIGRATOR)
                .await
                .context("cannot apply notification-service's migrations")?;
        }
        let listener = settings.http.bind().await?;
        let verifier = settings
            .auth
            .verifier()
            .map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        settings
            .mail
            .validate()
            .map_err(|e| anyhow::anyhow!("mail: {e}"))?;
        let mailer = settings
            .mail
            .enabled
            .then(|| Mailer::new(pool.clone(), settings.mail.clone()))
            .transpose()
            .map_err(|e| anyhow::anyhow!("mail: {e}"))?;
        let consumer = settings
            .consumer
            .enabled
            .then(|| {
                EventConsumer::new(
                    &settings.kafka,
                    settings.consumer.clone(),
                    SERVICE_NAME,
                    &settings.topics.payment_results,
                    pool.clone(),
                    Queuer {
                        mail: settings.mail.clone(),
                    },
                )
            })
            .transpose()
            .context("cannot create the Kafka consumer for payment results")?;
        let router = router(pool, std::sync::Arc::new(verifier));
        Ok(Self {
            listener,
            router,
            registry: settings.registry,
            http_limits: settings.http.limits.clone(),
            mailer,
            consumer,
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

    /// Serves, consumes and mails until `shutdown`; then deregisters, finishes the
    /// rounds in flight and commits its offsets.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(service = SERVICE_NAME, addr = %self.local_addr(), "listening");
        let mut workers = Vec::new();
        if let Some(mailer) = self.mailer {
            workers.push(mailer.run(shutdown.clone()).boxed());
        }
        if let Some(consumer) = self.consumer {
            workers.push(consumer.run(shutdown.clone()).boxed());
        }
        shared::registry::serve_registered_with_workers(
            SERVICE_NAME,
            self.listener,
            self.router,
            &self.http_limits,
            &self.registry,
            shutdown,
            workers,
        )
        .await?;
        Ok(())
    }
}

/// The HTTP routes of notification-service: the actuator, and the API behind token verification.
pub fn router(pool: PgPool, verifier: std::sync::Arc<JwtVerifier>) -> Router {
    let actuator = Actuator::for_service(
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        &pool,
        verifier.clone(),
    );
    let api = api::routes(api::Api {
        pool,
        verifier: verifier.clone(),
    });
    shared::http::service_router(
        actuator
            .router()
            .merge(shared::openapi::route(openapi::document())),
        api,
        verifier,
    )
}
