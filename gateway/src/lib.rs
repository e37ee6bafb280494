//! gateway: the API gateway (Spring Cloud Gateway's job): JWT authentication and routes to live instances.
//!
//! [`Application::build`] binds the listener; [`Application::run_until_stopped`]
//! serves until the shutdown token fires. Tests build it with port 0.

pub mod routes;

use std::net::SocketAddr;

use axum::Router;
use serde::{Deserialize, Serialize};
use shared::{
    actuator::Actuator,
    config::{HttpSettings, Layers},
    registry::RegistrySettings,
    telemetry::LogSettings,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The canonical service name.
pub const SERVICE_NAME: &str = "gateway";

/// The port the contract gives gateway by default.
pub const DEFAULT_PORT: u16 = 8080;

/// Everything gateway reads at start-up; env prefix `GATEWAY_`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub http: HttpSettings,
    pub log: LogSettings,
    pub registry: RegistrySettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::local(DEFAULT_PORT),
            log: LogSettings::default(),
            registry: RegistrySettings::default(),
        }
    }
}

impl Settings {
    /// Defaults, then `GATEWAY_CONFIG`'s file, then `REGISTRY_URL` / `REGISTRY_TOKEN`,
    /// then `GATEWAY_*` variables.
    pub fn load() -> Result<Self, shared::config::ConfigError> {
        Layers::new("GATEWAY_").registry_client().load()
    }
}

/// A bound, ready-to-run gateway.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    registry: RegistrySettings,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = settings.http.bind().await?;
        Ok(Self {
            listener,
            router: router(),
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

/// The HTTP routes of gateway.
pub fn router() -> Router {
    let actuator = Actuator::new(SERVICE_NAME, env!("CARGO_PKG_VERSION"));
    shared::http::with_problem_fallbacks(Router::new().merge(actuator.router()))
}
