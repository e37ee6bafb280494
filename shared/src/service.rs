//! One shell for the store's services (order, payment, notification): what each of
//! them builds the same way, built once.
//!
//! [`ServiceBuilder::start`] opens the database pool (applying the service's
//! migrations), binds the listener and makes the token verifier; the service then
//! adds its background workers ([`ServiceBuilder::relay`], [`ServiceBuilder::consumer`],
//! [`ServiceBuilder::worker`]) and finishes with its API routes
//! ([`ServiceBuilder::build`]), which get the actuator, the OpenAPI document and the
//! cross-cutting layers of [`crate::http::service_router`]: the request id, the
//! request span (trace and request id on every log line), the HTTP metrics, the
//! request timeout, problem+json for bare errors, and authentication. [`Service::run_until_stopped`] serves, registers and runs the
//! workers until shutdown, then lets each finish what it has in flight.

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use axum::Router;
use futures::{FutureExt, future::BoxFuture};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    actuator::Actuator,
    auth::{JwtVerifier, ServiceAuthSettings},
    config::{ConnectionLimits, DatabaseSettings, HttpSettings},
    consumer::{ConsumerLoopSettings, EventConsumer, Handler},
    kafka::KafkaSettings,
    outbox::{Relay, RelaySettings},
    registry::RegistrySettings,
};

/// A background task of a service, started when it runs.
type Worker = Box<dyn FnOnce(CancellationToken) -> BoxFuture<'static, ()> + Send>;

/// What every service is made of, as it starts.
#[derive(Debug)]
pub struct ServiceParts<'a> {
    /// The name it registers under, and its consumer group by default.
    pub name: &'static str,
    /// Its crate version, for `/actuator/info`.
    pub version: &'static str,
    /// The PostgreSQL schema it owns, and that schema's migrations.
    pub schema: &'static str,
    pub migrator: &'static sqlx::migrate::Migrator,
    pub http: &'a HttpSettings,
    pub database: &'a DatabaseSettings,
    pub auth: &'a ServiceAuthSettings,
    pub registry: &'a RegistrySettings,
}

/// A service being put together.
pub struct ServiceBuilder {
    name: &'static str,
    version: &'static str,
    pool: PgPool,
    verifier: Arc<JwtVerifier>,
    listener: TcpListener,
    tls: Option<crate::tls::TlsAcceptor>,
    registry: RegistrySettings,
    limits: ConnectionLimits,
    request_timeout: std::time::Duration,
    workers: Vec<Worker>,
    /// The Kafka settings of the relay and consumers, checked against the brokers
    /// before the service serves.
    kafka: Option<KafkaSettings>,
}

impl std::fmt::Debug for ServiceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBuilder")
            .field("name", &self.name)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl ServiceBuilder {
    /// The pool (migrated when `database.migrate`), the listener and the verifier.
    pub async fn start(parts: ServiceParts<'_>) -> anyhow::Result<Self> {
        let pool = crate::db::connect_lazy(parts.database, parts.schema)
            .context("database.url is not a valid PostgreSQL URL")?;
        if parts.database.migrate {
            crate::db::migrate(&pool, parts.schema, parts.migrator)
                .await
                .with_context(|| format!("cannot apply {}'s migrations", parts.name))?;
        }
        if parts.registry.enabled {
            // Made here only to refuse unusable settings (a CA file) before serving.
            crate::registry::RegistryClient::new(parts.registry).map_err(|e| anyhow::anyhow!(e))?;
        }
        let tls = parts.http.tls_acceptor()?;
        let listener = parts.http.bind().await?;
        let verifier = parts
            .auth
            .verifier()
            .map_err(|e| anyhow::anyhow!("auth: {e}"))?;
        Ok(Self {
            name: parts.name,
            version: parts.version,
            pool,
            verifier: Arc::new(verifier),
            listener,
            tls,
            registry: parts.registry.clone(),
            limits: parts.http.limits.clone(),
            request_timeout: std::time::Duration::from_millis(parts.http.request_timeout_ms.max(1)),
            workers: Vec::new(),
            kafka: None,
        })
    }

    /// Refuses Kafka settings this build cannot honour, and keeps them for the
    /// connection check at start.
    fn uses_kafka(&mut self, kafka: &KafkaSettings) -> anyhow::Result<()> {
        kafka.check().map_err(|e| anyhow::anyhow!(e))?;
        self.kafka = Some(kafka.clone());
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn verifier(&self) -> Arc<JwtVerifier> {
        self.verifier.clone()
    }

    /// The outbox relay for the rows whose trigger notifies `channel`, when enabled.
    pub fn relay(
        mut self,
        kafka: &KafkaSettings,
        settings: &RelaySettings,
        channel: &str,
    ) -> anyhow::Result<Self> {
        if !settings.enabled {
            return Ok(self);
        }
        self.uses_kafka(kafka)?;
        let relay = Relay::new(self.pool.clone(), kafka, channel, settings.clone())
            .context("cannot create the Kafka producer for the outbox")?;
        Ok(self.worker(move |shutdown| relay.run(shutdown)))
    }

    /// A consumer of `topic` applying its events with `handler`, when enabled.
    pub fn consumer<H: Handler>(
        mut self,
        kafka: &KafkaSettings,
        settings: &ConsumerLoopSettings,
        topic: &str,
        handler: H,
    ) -> anyhow::Result<Self> {
        if !settings.enabled {
            return Ok(self);
        }
        self.uses_kafka(kafka)?;
        let consumer = EventConsumer::new(
            kafka,
            settings.clone(),
            self.name,
            topic,
            self.pool.clone(),
            handler,
        )
        .with_context(|| format!("cannot create the Kafka consumer of {topic}"))?;
        Ok(self.worker(move |shutdown| consumer.run(shutdown)))
    }

    /// Any other background task; it must return soon after `shutdown` fires.
    pub fn worker<F, Fut>(mut self, start: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.workers
            .push(Box::new(move |shutdown| start(shutdown).boxed()));
        self
    }

    /// The service with its `api` routes (authenticated) beside the actuator and the
    /// OpenAPI document.
    pub fn build(self, api: Router, openapi: utoipa::openapi::OpenApi) -> Service {
        let actuator =
            Actuator::for_service(self.name, self.version, &self.pool, self.verifier.clone());
        let router = crate::http::service_router(
            actuator.router().merge(crate::openapi::route(openapi)),
            api,
            self.verifier,
            self.request_timeout,
        );
        Service {
            name: self.name,
            listener: self.listener,
            tls: self.tls,
            router,
            registry: self.registry,
            limits: self.limits,
            workers: self.workers,
            kafka: self.kafka,
        }
    }
}

/// A bound, ready-to-run service.
pub struct Service {
    name: &'static str,
    listener: TcpListener,
    tls: Option<crate::tls::TlsAcceptor>,
    router: Router,
    registry: RegistrySettings,
    limits: ConnectionLimits,
    workers: Vec<Worker>,
    kafka: Option<KafkaSettings>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("addr", &self.local_addr())
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

impl Service {
    /// The address really bound (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Serves and runs the workers until `shutdown`; then deregisters, and waits for
    /// every worker to finish its round in flight (offsets committed, outbox rows
    /// settled).
    ///
    /// Kafka that refuses this service's credentials or certificate stops it here,
    /// with the broker's reason: no retry can mend that. Kafka that does not answer
    /// only gets a warning, since the clients keep trying and a broker may be
    /// starting.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        if let Some(kafka) = &self.kafka {
            match kafka.verify_connection().await {
                Ok(()) => {}
                Err(refused @ crate::kafka::ConnectError::Refused(_)) => {
                    return Err(anyhow::anyhow!(refused).context(format!(
                        "{} cannot use Kafka at {}",
                        self.name, kafka.brokers
                    )));
                }
                Err(unreachable) => {
                    tracing::warn!(brokers = %kafka.brokers, "{unreachable}; starting anyway, the Kafka clients keep trying");
                }
            }
        }
        tracing::info!(service = self.name, addr = %self.local_addr(), "listening");
        let workers = self
            .workers
            .into_iter()
            .map(|start| start(shutdown.clone()))
            .collect();
        crate::registry::serve_registered_with_workers(
            self.name,
            crate::server::Server {
                listener: self.listener,
                router: self.router,
                limits: self.limits,
                tls: self.tls,
            },
            &self.registry,
            shutdown,
            workers,
        )
        .await?;
        Ok(())
    }
}
