//! order-service: the orders of the store, kept in PostgreSQL.
//!
//! [`Application::build`] binds the listener and prepares the database pool;
//! [`Application::run_until_stopped`] serves until the shutdown token fires. Tests
//! build it with port 0 and drive it over a real socket.

pub mod openapi;
pub mod orders;
pub mod results;
pub mod timeline;
pub mod validation;

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
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The canonical service name, as registered.
pub const SERVICE_NAME: &str = "order-service";

/// The PostgreSQL schema order-service owns.
pub const SCHEMA: &str = "orders";

/// The channel the outbox trigger notifies (see the migrations).
pub const OUTBOX_CHANNEL: &str = "orders_outbox";

/// The migrations of [`SCHEMA`], compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Everything order-service reads at start-up; env prefix `ORDER_`.
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
    /// Defaults, then `ORDER_CONFIG`'s file, then `DATABASE_URL` / `KAFKA_BROKERS`,
    /// `REGISTRY_URL` / `REGISTRY_TOKEN` / `GATEWAY_URL`, then `ORDER_*` variables.
    pub fn load() -> Result<Self, shared::config::ConfigError> {
        Layers::new("ORDER_")
            .spans()
            .fallback_env("DATABASE_URL", "database.url")
            .fallback_env("KAFKA_BROKERS", "kafka.brokers")
            .registry_client()
            .gateway_tokens()
            .load()
    }
}

/// A bound, ready-to-run order-service.
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
            &settings.topics.payment_results,
            results::ResultApplier,
        )?;
        let pool = shell.pool().clone();
        // The timeline follows notification-service until the service stops.
        let following = CancellationToken::new();
        let api = orders::routes(orders::Api {
            pool: pool.clone(),
            verifier: shell.verifier(),
            orders_topic: settings.topics.orders,
            notifications: timeline::Notifications::new(&settings.registry, following.clone())
                .map_err(|e| anyhow::anyhow!(e))?,
        });
        Ok(Self(
            shell
                .worker(move |shutdown| count_orders_by_status(pool, shutdown))
                .worker(move |shutdown| async move {
                    shutdown.cancelled().await;
                    following.cancel();
                })
                .build(api, openapi::document()),
        ))
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

/// Keeps the gauge `orders{status}` (orders by status, from the table itself) fresh:
/// a count every five seconds, cheap on the status index.
async fn count_orders_by_status(pool: PgPool, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if let Ok(counts) = orders::StatusCounts::load(&pool).await {
            for (status, n) in [
                ("PENDING", counts.pending),
                ("CONFIRMED", counts.confirmed),
                ("REJECTED", counts.rejected),
            ] {
                metrics::gauge!("orders", "status" => status).set(n as f64);
            }
        }
    }
}
