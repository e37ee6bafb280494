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

use serde::{Deserialize, Serialize};
use shared::{
    auth::ServiceAuthSettings,
    config::{DatabaseSettings, HttpSettings, Layers},
    consumer::ConsumerLoopSettings,
    events::Topics,
    kafka::KafkaSettings,
    registry::RegistrySettings,
    service::{Service, ServiceBuilder, ServiceParts},
    telemetry::LogSettings,
};
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
pub struct Application(Service);

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        settings
            .mail
            .validate()
            .map_err(|e| anyhow::anyhow!("mail: {e}"))?;
        let shell = ServiceBuilder::start(ServiceParts {
            name: SERVICE_NAME,
            version: env!("CARGO_PKG_VERSION"),
            schema: SCHEMA,
            migrator: &MIGRATOR,
            http: &settings.http,
            database: &settings.database,
            auth: &settings.auth,
            registry: &settings.registry,
        })
        .await?
        .consumer(
            &settings.kafka,
            &settings.consumer,
            &settings.topics.payment_results,
            Queuer {
                mail: settings.mail.clone(),
            },
        )?;
        let shell = if settings.mail.enabled {
            let mailer = Mailer::new(shell.pool().clone(), settings.mail.clone())
                .map_err(|e| anyhow::anyhow!("mail: {e}"))?;
            shell.worker(move |shutdown| mailer.run(shutdown))
        } else {
            shell
        };
        let api = api::routes(api::Api {
            pool: shell.pool().clone(),
            verifier: shell.verifier(),
        });
        Ok(Self(shell.build(api, openapi::document())))
    }

    /// The address really bound (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }

    /// Serves, consumes and mails until `shutdown`; then deregisters, finishes the
    /// rounds in flight and commits its offsets.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.0.run_until_stopped(shutdown).await
    }
}
