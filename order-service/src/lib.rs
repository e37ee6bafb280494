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
    outbox::{Relay, RelaySettings},
    registry::RegistrySettings,
    telemetry::LogSettings,
};
use sqlx::PgPool;
use tokio::net::TcpListener;
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
pub struct Application {
    listener: TcpListener,
    router: Router,
    registry: RegistrySettings,
    http_limits: shared::config::ConnectionLimits,
    relay: Option<Relay>,
    consumer: Option<EventConsumer<results::ResultApplier>>,
    pool: PgPool,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let pool = shared::db::connect_lazy(&settings.database, SCHEMA)
            .context("database.url is not a valid PostgreSQL URL")?;
        if settings.database.migrate {
            shared::db::migrate(&pool, SCHEMA, &MIGRATOR)
                .await
                .context("cannot apply order-service's migrations")?;
        }
        let listener = settings.http.bind().await?;
        let verifier = settings
            .auth
            .verifier()
            .map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        let relay = settings
            .outbox
            .enabled
            .then(|| {
                Relay::new(
                    pool.clone(),
                    &settings.kafka,
                    OUTBOX_CHANNEL,
                    settings.outbox.clone(),
                )
            })
            .transpose()
            .context("cannot create the Kafka producer for the outbox")?;
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
                    results::ResultApplier,
                )
            })
            .transpose()
            .context("cannot create the Kafka consumer for payment results")?;
        let router = router(
            pool.clone(),
            std::sync::Arc::new(verifier),
            settings.topics.orders,
            timeline::Notifications::new(&settings.registry),
        );
        Ok(Self {
            listener,
            router,
            registry: settings.registry,
            http_limits: settings.http.limits.clone(),
            relay,
            consumer,
            pool,
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

    /// Serves, relays and consumes until `shutdown`; then deregisters, finishes the
    /// round in flight and commits its offsets.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(service = SERVICE_NAME, addr = %self.local_addr(), "listening");
        let mut workers = Vec::new();
        if let Some(relay) = self.relay {
            workers.push(relay.run(shutdown.clone()).boxed());
        }
        if let Some(consumer) = self.consumer {
            workers.push(consumer.run(shutdown.clone()).boxed());
        }
        workers.push(count_orders_by_status(self.pool, shutdown.clone()).boxed());
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

/// The HTTP routes of order-service: the actuator, and the API behind token verification.
pub fn router(
    pool: PgPool,
    verifier: std::sync::Arc<JwtVerifier>,
    orders_topic: String,
    notifications: timeline::Notifications,
) -> Router {
    let actuator = Actuator::for_service(
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        &pool,
        verifier.clone(),
    );
    let api = orders::routes(orders::Api {
        pool,
        verifier: verifier.clone(),
        orders_topic,
        notifications,
    });
    shared::http::service_router(
        actuator
            .router()
            .merge(shared::openapi::route(openapi::document())),
        api,
        verifier,
    )
}
