//! registry: the service registry (Eureka's job), without Eureka's minutes-long delays.
//!
//! Instances hold leases in a [`leases::LeaseTable`]; an instance disappears the
//! moment its lease ends and every watcher hears of it within the reaper's tick. The
//! table is served three ways: the native JSON API with blocking queries and a push
//! stream ([`api`]), the Eureka REST API that Spring, Python and JavaScript Eureka
//! clients use unchanged ([`eureka`]), and a dashboard page ([`dashboard`]).
//!
//! [`Application::build`] binds the listener; [`Application::run_until_stopped`]
//! serves and runs the reaper until the shutdown token fires.

pub mod api;
pub mod auth;
pub mod dashboard;
pub mod eureka;
pub mod leases;
pub mod model;
pub mod peers;
pub mod watchers;

use std::{collections::BTreeSet, net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use serde::{Deserialize, Serialize};
use shared::{
    actuator::Actuator,
    config::{HttpSettings, Layers},
    telemetry::LogSettings,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::AuthSettings,
    leases::{LeaseSettings, LeaseTable, now_ms},
    peers::{PeerSettings, Peers},
};

/// The canonical service name.
pub const SERVICE_NAME: &str = "registry";

/// The port the contract gives the registry by default.
pub const DEFAULT_PORT: u16 = 8761;

/// Everything the registry reads at start-up; env prefix `REGISTRY_`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub http: HttpSettings,
    pub log: LogSettings,
    pub tracing: shared::telemetry::TracingSettings,
    pub leases: LeaseSettings,
    pub auth: AuthSettings,
    /// Other registry nodes that share this one's table.
    pub peers: PeerSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::local(DEFAULT_PORT),
            log: LogSettings::default(),
            tracing: Default::default(),
            leases: LeaseSettings::default(),
            auth: AuthSettings::default(),
            peers: PeerSettings::default(),
        }
    }
}

impl Settings {
    /// Defaults, then `REGISTRY_CONFIG`'s file, then `REGISTRY_TOKEN` (the stack's
    /// write token) into `auth.token`, then `REGISTRY_*` variables.
    pub fn load() -> Result<Self, shared::config::ConfigError> {
        Layers::new("REGISTRY_")
            .spans()
            .fallback_env("REGISTRY_TOKEN", "auth.token")
            .load()
    }
}

/// A bound, ready-to-run registry.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    router: Router,
    table: Arc<LeaseTable>,
    http_limits: shared::config::ConnectionLimits,
    tls: Option<shared::tls::TlsAcceptor>,
    peers: Option<Peers>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        if settings.auth.token.as_deref().is_none_or(str::is_empty) {
            if !settings.auth.open_writes {
                anyhow::bail!(
                    "no registry token configured: set auth.token (REGISTRY_TOKEN), or, for \
                     local experiments only, auth.open_writes = true (REGISTRY_AUTH__OPEN_WRITES) \
                     to let anyone who reaches the registry change it"
                );
            }
            tracing::warn!(
                "auth.open_writes: no registry token, anyone who can reach the registry can change it"
            );
        }
        let tls = settings.http.tls_acceptor()?;
        let listener = settings.http.bind().await?;
        let peers = Peers::new(&settings.peers, settings.auth.token.as_deref())?;
        let table = Arc::new(LeaseTable::replicating(
            settings.leases.clone(),
            peers.as_ref().map(Peers::fanout),
        ));
        let router = router(table.clone(), settings.auth);
        Ok(Self {
            listener,
            router,
            table,
            http_limits: settings.http.limits.clone(),
            tls,
            peers,
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

    /// The table, for tests that look inside.
    pub fn table(&self) -> Arc<LeaseTable> {
        self.table.clone()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(service = SERVICE_NAME, addr = %self.local_addr(), node = self.table.node(), "listening");
        if let Some(peers) = self.peers.clone() {
            // Serve at once (peers and clients hear "starting" until the copy is
            // done), copy the table from a peer, then start sending writes to them.
            let table = self.table.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                peers.sync(&table, &stop).await;
                peers.spawn_senders(table, stop);
            });
        }
        let reaper = tokio::spawn(reap(self.table.clone(), shutdown.clone()));
        let table = self.table.clone();
        let closer = shutdown.clone();
        tokio::spawn(async move {
            closer.cancelled().await;
            table.close();
        });
        shared::server::serve(
            self.listener,
            self.router,
            shutdown.clone(),
            &self.http_limits,
            self.tls,
        )
        .await?;
        shutdown.cancel();
        let _ = reaper.await;
        Ok(())
    }
}

/// Removes expired leases every `reaper_interval_ms`, and refreshes the per-service
/// gauges once a second.
async fn reap(table: Arc<LeaseTable>, shutdown: CancellationToken) {
    let period = Duration::from_millis(table.settings().reaper_interval_ms.max(10));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut gauges_at = 0;
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let now = now_ms();
        table.expire(now);
        if now >= gauges_at {
            gauges_at = now + 1000;
            update_gauges(&table, now, &mut known);
        }
    }
}

fn update_gauges(table: &LeaseTable, now: u64, known: &mut BTreeSet<String>) {
    let snapshot = table.snapshot();
    let mut seen = BTreeSet::new();
    for service in snapshot.services.keys() {
        let count = snapshot.instances(service, now).count();
        metrics::gauge!("registry_instances", "service" => service.to_string()).set(count as f64);
        seen.insert(service.to_string());
    }
    for gone in known.difference(&seen) {
        metrics::gauge!("registry_instances", "service" => gone.clone()).set(0.0);
    }
    *known = seen;
    metrics::gauge!("registry_self_preservation_active").set(if snapshot.preservation.is_some() {
        1.0
    } else {
        0.0
    });
}

/// Every route of the registry, with write authentication in front of the APIs.
pub fn router(table: Arc<LeaseTable>, auth: AuthSettings) -> Router {
    // The dashboard reads the table too, so `protect_reads` covers it.
    // A node still copying the table from its peers answers 503 to reads and client
    // writes, so its readiness probe says it cannot serve yet (Spring's
    // `readinessState`): an orchestrator sends it no traffic meanwhile. Liveness stays
    // UP; restarting a node that is syncing would only start the copy again.
    let starting = table.clone();
    let actuator = Actuator::new(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .operators(auth::operator_gate(&auth))
        .check("startup", move || {
            let ready = starting.is_ready();
            async move {
                match ready {
                    true => Ok(()),
                    false => Err("copying the table from its peers".to_owned()),
                }
            }
        });
    // Until a node has copied the table from its peers, what it would answer is
    // incomplete: 503, which clients take as "ask another peer". Peers' own
    // replication is accepted meanwhile.
    let served = Router::new()
        .merge(api::router(table.clone()))
        .merge(eureka::router(table.clone()))
        .merge(dashboard::router(table.clone()))
        .layer(axum::middleware::from_fn_with_state(
            table.clone(),
            peers::require_ready,
        ));
    let protected =
        served
            .merge(peers::router(table.clone()))
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(auth),
                auth::require_token,
            ));
    shared::http::with_problem_fallbacks(Router::new().merge(protected).merge(actuator.router()))
        .layer(axum::middleware::from_fn_with_state(
            table,
            peers::name_node,
        ))
}
