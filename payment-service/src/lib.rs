//! payment-service: accounts and payments; consumes `order-created`, debits exactly
//! once, publishes `payment-validated` / `payment-declined` through its outbox.
//!
//! [`Application::build`] applies the migrations, binds the listener and prepares the
//! relay and the consumer; [`Application::run_until_stopped`] serves until the
//! shutdown token fires. Tests build it with port 0 and drive it over a real socket.

pub mod api;
pub mod openapi;
pub mod processing;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use shared::{
    auth::ServiceAuthSettings,
    config::{DatabaseSettings, HttpSettings, Layers},
    consumer::ConsumerLoopSettings,
    events::Topics,
    kafka::KafkaSettings,
    outbox::RelaySettings,
    registry::RegistrySettings,
    service::{Service, ServiceBuilder, ServiceParts},
    telemetry::LogSettings,
};
use tokio_util::sync::CancellationToken;

use crate::processing::PaymentProcessor;

/// The canonical service name, as registered; also the default consumer group.
pub const SERVICE_NAME: &str = "payment-service";

/// The PostgreSQL schema payment-service owns.
pub const SCHEMA: &str = "payments";

/// The channel the outbox trigger notifies (see the migrations).
pub const OUTBOX_CHANNEL: &str = "payments_outbox";

/// The migrations of [`SCHEMA`], compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Everything payment-service reads at start-up; env prefix `PAYMENT_`.
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
    pub outbox: RelaySettings,
    pub consumer: ConsumerLoopSettings,
}

impl Settings {
    /// Defaults, then `PAYMENT_CONFIG`'s file, then `DATABASE_URL` / `KAFKA_BROKERS`,
    /// `REGISTRY_URL` / `REGISTRY_TOKEN` / `GATEWAY_URL`, then `PAYMENT_*` variables.
    pub fn load() -> Result<Self, shared::config::ConfigError> {
        Layers::new("PAYMENT_")
            .spans()
            .fallback_env("DATABASE_URL", "database.url")
            .fallback_env("KAFKA_BROKERS", "kafka.brokers")
            .registry_client()
            .gateway_tokens()
            .load()
    }
}

/// A bound, ready-to-run payment-service.
#[derive(Debug)]
pub struct Application(Service);

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
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
        .relay(&settings.kafka, &settings.outbox, OUTBOX_CHANNEL)?
        .consumer(
            &settings.kafka,
            &settings.consumer,
            &settings.topics.orders,
            PaymentProcessor {
                results_topic: settings.topics.payment_results.clone(),
            },
        )?;
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

    /// Serves, relays and consumes until `shutdown`; then deregisters, finishes the
    /// round in flight and commits its offsets.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.0.run_until_stopped(shutdown).await
    }
}
