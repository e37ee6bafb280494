//! gateway: the API gateway (Spring Cloud Gateway's job).
//!
//! It issues tokens for its own users and verifies every request's bearer token (its
//! own and external issuers') before routing it, by Spring-style routes
//! ([`routes`]), to a live instance from the registry ([`proxy`]). Its own endpoints:
//! `POST /auth/token`, `GET /.well-known/jwks.json`, the actuator, and
//! `GET /actuator/gateway/routes` (admins).
//!
//! [`Application::build`] binds and prepares everything; [`Application::run_until_stopped`]
//! serves until the shutdown token fires.

pub mod auth;
pub mod balancer;
pub mod breaker;
pub mod limits;
pub mod login;
pub mod openapi;
pub mod plan;
pub mod proxy;
pub mod report;
pub mod routes;
pub mod server;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use arc_swap::ArcSwap;
use axum::{
    Json, Router,
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::{
    Problem,
    actuator::Actuator,
    auth::JwtVerifier,
    config::{HttpSettings, Layers},
    registry::{Discovery, InstanceNetworks, RegistryClient, RegistrySettings},
    telemetry::LogSettings,
};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{GatewayAuthSettings, IdentityProvider},
    proxy::UpstreamSettings,
    routes::RouteTable,
};

/// The canonical service name.
pub const SERVICE_NAME: &str = "gateway";

/// The port the contract gives the gateway by default.
pub const DEFAULT_PORT: u16 = 8080;

/// The routes compiled into the binary.
pub const BUILTIN_ROUTES: &str = include_str!("../config/routes.yaml");

/// Everything the gateway reads at start-up; env prefix `GATEWAY_`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub http: HttpSettings,
    pub log: LogSettings,
    pub tracing: shared::telemetry::TracingSettings,
    pub registry: RegistrySettings,
    /// A YAML route file instead of the built-in routes.
    pub routes_file: Option<PathBuf>,
    pub auth: GatewayAuthSettings,
    pub upstream: UpstreamSettings,
    pub cors: limits::CorsSettings,
    /// A Redis server for `RequestRateLimiter`'s buckets, so that every gateway
    /// instance counts against one limit (`REDIS_URL`); none: each counts alone.
    pub redis: limits::RedisSettings,
    /// Request headers larger than this together are refused with 431.
    pub max_header_bytes: usize,
    /// Networks of the proxies in front of the gateway (a load balancer that ends
    /// TLS). Only from these are `X-Forwarded-For`, `-Proto` and `-Host` believed and
    /// extended; anyone else's are dropped, as a client could write anything there.
    /// Empty by default: the gateway is the edge.
    pub trusted_proxies: Vec<String>,
    /// Continue the trace a client's `traceparent` names even when the client is not
    /// a trusted proxy. Off by default: a client could otherwise have every request
    /// recorded (its sampled flag) or pick the trace id an order is filed under; its
    /// context is then only linked from a trace the gateway starts. The local stack
    /// turns it on so developers and tests can follow their own requests.
    pub client_traces: bool,
    /// Worker threads serving requests, each with its own listener and upstream pool;
    /// 0 is one per core.
    pub workers: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http: HttpSettings::local(DEFAULT_PORT),
            log: LogSettings::default(),
            tracing: Default::default(),
            registry: RegistrySettings::default(),
            routes_file: None,
            auth: GatewayAuthSettings::default(),
            upstream: UpstreamSettings::default(),
            cors: limits::CorsSettings::default(),
            redis: limits::RedisSettings::default(),
            max_header_bytes: 16 * 1024,
            trusted_proxies: Vec::new(),
            client_traces: false,
            workers: 0,
        }
    }
}

impl Settings {
    /// Defaults, then `GATEWAY_CONFIG`'s file, then `REGISTRY_URL` / `REGISTRY_TOKEN`
    /// and `REDIS_URL`, then `GATEWAY_*` variables.
    pub fn load() -> Result<Self, shared::config::ConfigError> {
        Layers::new("GATEWAY_")
            .spans()
            .registry_client()
            .fallback_env("REDIS_URL", "redis.url")
            .load()
    }

    /// The route table these settings name.
    pub fn route_table(&self) -> anyhow::Result<RouteTable> {
        let text = match &self.routes_file {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read routes_file {}", path.display()))?,
            None => BUILTIN_ROUTES.to_owned(),
        };
        RouteTable::from_yaml(&text).map_err(|e| anyhow::anyhow!("invalid routes: {e}"))
    }
}

/// What the request path shares.
pub struct Gateway {
    pub routes: ArcSwap<RouteTable>,
    pub discovery: Option<Discovery>,
    pub verifier: Arc<JwtVerifier>,
    /// One upstream pool per worker: a pooled connection is driven by the worker that
    /// opened it, so a request never waits on another thread's connection.
    clients: Vec<UpstreamClient>,
    /// The checked addresses of discovered instances' host names.
    pub pins: Pins,
    pub upstream: UpstreamSettings,
    pub balancer: balancer::Balancer,
    pub cors: limits::CorsSettings,
    /// `RequestRateLimiter`'s buckets in Redis, when configured.
    pub shared_buckets: Option<limits::SharedBuckets>,
    pub max_header_bytes: usize,
    /// Proxies whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Whether any client's `traceparent` is continued (else only a trusted proxy's).
    pub client_traces: bool,
    /// The share of the traces the gateway starts that are sampled, when it starts
    /// them without the span layer.
    pub sampling_probability: f64,
    /// Where the routes come from; `None` for the built-in ones.
    routes_file: Option<PathBuf>,
    /// Prometheus's static credential for `/actuator/prometheus`.
    metrics_token: Option<String>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.routes.load().routes.len())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// The upstream pool of the worker this runs on.
    pub fn client(&self) -> &UpstreamClient {
        &self.clients[server::current_worker() % self.clients.len()]
    }

    /// Re-reads the routes and swaps the table in one step. A file that does not
    /// compile leaves the table in force and says why.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.routes_file else {
            return Ok(self.routes.load().routes.len());
        };
        let outcome = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|text| RouteTable::from_yaml(&text).map_err(|e| e.to_string()));
        match outcome {
            Ok(table) => {
                if let Some(discovery) = &self.discovery {
                    for service in table.services() {
                        discovery.follow(&service);
                    }
                }
                let count = table.routes.len();
                self.routes.store(Arc::new(table));
                metrics::counter!("gateway_route_reloads_total", "outcome" => "applied")
                    .increment(1);
                tracing::info!(routes = count, "routes reloaded");
                Ok(count)
            }
            Err(reason) => {
                metrics::counter!("gateway_route_reloads_total", "outcome" => "refused")
                    .increment(1);
                tracing::warn!(%reason, "new routes refused; the previous routes stay in force");
                Err(reason)
            }
        }
    }
}

/// Reloads the routes whenever their file's modification time changes.
async fn watch_routes(gateway: Arc<Gateway>, path: PathBuf, stop: CancellationToken) {
    let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let now = modified(&path);
        if now != seen {
            seen = now;
            let _ = gateway.reload();
        }
    }
}

/// A bound, ready-to-run gateway.
#[derive(Debug)]
pub struct Application {
    /// One per worker, all on the same port.
    listeners: Vec<std::net::TcpListener>,
    tls: Option<shared::tls::TlsAcceptor>,
    front: Front,
    registry: RegistrySettings,
    http_limits: shared::config::ConnectionLimits,
    background: CancellationToken,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let table = settings.route_table()?;
        let mut idp = IdentityProvider::new(&settings.auth).map_err(|e| anyhow::anyhow!(e))?;
        let mut verifier = JwtVerifier::new(&settings.auth.external)
            .map_err(|e| anyhow::anyhow!("auth.external: {e}"))?;
        if let Some(signer) = &idp.signer {
            verifier.trust_signer(signer);
        }
        let background = CancellationToken::new();
        let services = table.services();
        let networks = InstanceNetworks::parse(&settings.upstream.instance_networks)
            .map_err(|e| anyhow::anyhow!("upstream.instance_networks: {e}"))?;
        let discovery = match settings.registry.enabled {
            true => {
                let client =
                    RegistryClient::new(&settings.registry).map_err(|e| anyhow::anyhow!(e))?;
                let names: Vec<&str> = services.iter().map(String::as_str).collect();
                Some(Discovery::start_within(
                    client,
                    &names,
                    background.clone(),
                    Some(Arc::new(networks)),
                ))
            }
            false => None,
        };
        let workers = server::worker_count(settings.workers);
        let upstream_tls = shared::tls::client_config(&settings.upstream.ca_files)
            .map_err(|e| anyhow::anyhow!("upstream.ca_files: {e}"))?;
        let pins = Pins::default();
        let clients = (0..workers)
            .map(|_| upstream_client(&settings.upstream, upstream_tls.clone(), &pins))
            .collect();
        let tls = settings.http.tls_acceptor()?;
        let gateway = Arc::new(Gateway {
            routes: ArcSwap::from_pointee(table),
            discovery,
            verifier: Arc::new(verifier),
            clients,
            pins,
            upstream: settings.upstream.clone(),
            balancer: balancer::Balancer::default(),
            cors: settings.cors.clone(),
            shared_buckets: limits::SharedBuckets::new(&settings.redis)
                .map_err(|e| anyhow::anyhow!(e))?,
            max_header_bytes: settings.max_header_bytes,
            trusted_proxies: settings
                .trusted_proxies
                .iter()
                .map(|n| shared::networks::parse_network(n))
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?,
            client_traces: settings.client_traces,
            sampling_probability: settings.tracing.sampling_probability.clamp(0.0, 1.0),
            routes_file: settings.routes_file.clone(),
            metrics_token: settings
                .auth
                .metrics_token
                .clone()
                .filter(|t| !t.is_empty()),
        });
        if let Some(path) = settings.routes_file.clone() {
            tokio::spawn(watch_routes(gateway.clone(), path, background.clone()));
        }
        tokio::spawn(forget_departed(gateway.clone(), background.clone()));
        let listeners = server::bind(&settings.http.host, settings.http.port, workers)?;
        Ok(Self {
            listeners,
            tls,
            front: {
                idp.trusted_proxies = gateway.trusted_proxies.clone();
                Front {
                    own: router(gateway.clone(), Arc::new(idp)),
                    gateway,
                }
            },
            registry: settings.registry,
            http_limits: settings.http.limits.clone(),
            background,
        })
    }

    /// The address really bound (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners[0]
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(service = SERVICE_NAME, addr = %self.local_addr(), "listening");
        let bound = self.local_addr();
        let (listeners, front, limits, tls) =
            (self.listeners, self.front, self.http_limits, self.tls);
        let result = shared::registry::serve_registered_by(
            SERVICE_NAME,
            bound,
            tls.is_some(),
            &self.registry,
            shutdown,
            |stop| server::serve(listeners, front, stop, limits, tls),
        )
        .await;
        self.background.cancel();
        result?;
        Ok(())
    }
}

/// The upstream pool: `http://` and `https://` (certificates always verified).
pub type UpstreamClient = Client<SharedConnector, axum::body::Body>;

type Connector = HttpsConnector<HttpConnector<PinningResolver>>;

/// The upstream connector behind one pointer. The pooled client clones its connector
/// for every request it sends, pooled connection or not; this one (TLS settings,
/// resolver, pins) would cost a handful of reference counts up and down each time,
/// for what only opening a connection uses.
#[derive(Clone, Debug)]
pub struct SharedConnector(Arc<Connector>);

impl tower::Service<axum::http::Uri> for SharedConnector {
    type Response = <Connector as tower::Service<axum::http::Uri>>::Response;
    type Error = <Connector as tower::Service<axum::http::Uri>>::Error;
    type Future = <Connector as tower::Service<axum::http::Uri>>::Future;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Readiness is the copy's to say, in `call`: the connector holds no capacity
        // of its own (the resolver and the TLS layer are always ready).
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: axum::http::Uri) -> Self::Future {
        Connector::clone(&self.0).call(uri)
    }
}

/// Host names of discovered instances, pinned to the address discovery checked
/// against `upstream.instance_networks`. An `https://` instance is dialled by name (its
/// certificate must name it), and this makes the name lead to the checked address,
/// not to whatever DNS says at connect time.
#[derive(Debug, Clone, Default)]
pub struct Pins(Arc<std::sync::RwLock<std::collections::HashMap<String, std::net::IpAddr>>>);

impl Pins {
    /// Pins `host` to `ip` (the latest check wins).
    pub fn pin(&self, host: &str, ip: std::net::IpAddr) {
        let known = self
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .copied();
        if known != Some(ip) {
            self.0
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(host.to_owned(), ip);
        }
    }

    fn get(&self, host: &str) -> Option<std::net::IpAddr> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .copied()
    }

    /// Unpins every name no discovered instance has any more.
    pub fn forget_departed(&self, listed: &std::collections::HashSet<&str>) {
        let departed = self
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .any(|host| !listed.contains(host.as_str()));
        if departed {
            self.0
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|host, _| listed.contains(host.as_str()));
        }
    }
}

/// Keeps the balancer's health records and the pinned names to the instances
/// discovery lists: every change of a followed service prunes those that left
/// before it.
async fn forget_departed(gateway: Arc<Gateway>, stop: CancellationToken) {
    let Some(discovery) = gateway.discovery.as_ref() else {
        return;
    };
    let mut changes = discovery.changes();
    // A request may pick an instance from the list just before a change and pin or
    // mark it just after: only what two lists in a row no longer hold is forgotten.
    let mut before = discovery.known();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = stop.cancelled() => return,
        }
        let now = discovery.known();
        let both = || now.iter().chain(before.iter()).flat_map(|list| list.iter());
        let addresses: std::collections::HashSet<&str> =
            both().map(|i| i.address.as_str()).collect();
        let hosts: std::collections::HashSet<&str> = both().map(|i| i.host.as_str()).collect();
        gateway.balancer.forget_departed(&addresses);
        gateway.pins.forget_departed(&hosts);
        before = now;
    }
}

/// The upstream connector's resolver: pinned names first, the system's resolver for
/// every other name (the hosts of fixed `uri`s, the operator's own).
#[derive(Debug, Clone)]
pub struct PinningResolver {
    pins: Pins,
    system: hyper_util::client::legacy::connect::dns::GaiResolver,
}

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for PinningResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        if let Some(ip) = self.pins.get(name.as_str()) {
            return Box::pin(std::future::ready(Ok(
                vec![SocketAddr::new(ip, 0)].into_iter()
            )));
        }
        let lookup = self.system.call(name);
        Box::pin(async move { Ok(lookup.await?.collect::<Vec<_>>().into_iter()) })
    }
}

/// A pool of upstream connections with the configured timeouts, verifying `https://`
/// upstreams against the system roots and `upstream.ca_files`.
fn upstream_client(
    settings: &UpstreamSettings,
    tls: shared::tls::ClientConfig,
    pins: &Pins,
) -> UpstreamClient {
    let mut connector = HttpConnector::new_with_resolver(PinningResolver {
        pins: pins.clone(),
        system: hyper_util::client::legacy::connect::dns::GaiResolver::new(),
    });
    connector.set_connect_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)));
    connector.set_nodelay(true);
    // A pooled connection, or a joined WebSocket, whose upstream vanished is found by
    // probes, as the server finds its clients'.
    connector.set_keepalive(Some(shared::server::PROBE_AFTER));
    connector.set_keepalive_interval(Some(shared::server::PROBE_EVERY));
    connector.set_keepalive_retries(Some(shared::server::PROBES));
    // The TLS layer above it handles `https://`; this one only opens the socket.
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_millis(settings.pool_idle_timeout_ms))
        .build(SharedConnector(Arc::new(connector)))
}

/// What serves every request: the gateway's own endpoints through axum's router, and
/// every other request (nearly all of them) straight to the proxy, without the
/// router's matching, its middleware and the futures they wrap around each other.
/// What a client gets is the same either way: the router's fallback is the proxy,
/// behind the same conversion of bare errors to problem+json.
#[derive(Clone, Debug)]
pub struct Front {
    own: Router,
    gateway: Arc<Gateway>,
}

impl Front {
    /// Whether `path` may be one of the gateway's own endpoints (see [`router`]);
    /// any other goes to an upstream.
    fn may_be_own(path: &str) -> bool {
        path == "/auth/token" || path == "/.well-known/jwks.json" || path.starts_with("/actuator")
    }
}

/// Not a tower service: its future is one the connection keeps in place, where a
/// service's would be boxed for every request (a large one, for a proxied request).
impl shared::server::Answer for Front {
    fn answer(
        &self,
        request: Request,
        peer: SocketAddr,
    ) -> impl std::future::Future<Output = Response> + Send + 'static + use<> {
        let own = Self::may_be_own(request.uri().path()).then(|| self.own.clone());
        let gateway = self.gateway.clone();
        async move {
            match own {
                Some(own) => own.answer(request, peer).await,
                None => proxy::forward_request(gateway, request, peer).await,
            }
        }
    }
}

/// The gateway's own endpoints, then everything else through the proxy.
fn router(gateway: Arc<Gateway>, idp: Arc<IdentityProvider>) -> Router {
    let identity = Router::new()
        .route(
            "/auth/token",
            post(auth::token).layer(axum::extract::DefaultBodyLimit::max(
                auth::MAX_TOKEN_REQUEST_BYTES,
            )),
        )
        .route("/.well-known/jwks.json", get(auth::jwks))
        .with_state(idp);
    let admin = Router::new()
        .route("/actuator/gateway/routes", get(report::routes))
        .route("/actuator/gateway/routes/{id}", get(report::route))
        .route("/actuator/gateway/refresh", post(refresh))
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            require_admin,
        ))
        .with_state(gateway.clone());
    let actuator = Actuator::new(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .operators(shared::auth::admin_gate(gateway.verifier.clone()))
        .router::<()>()
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            require_token_except_health,
        ));
    let proxied = Router::new().fallback(proxy::forward).with_state(gateway);
    Router::new()
        .merge(identity)
        .merge(admin)
        .merge(actuator)
        .merge(proxied)
        .layer(axum::middleware::from_fn(
            shared::http::problem_for_bare_errors,
        ))
}

/// Any valid token, except for `/actuator/health`, which load balancers call bare.
async fn require_token_except_health(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    // Health and its probe groups answer load balancers and orchestrators, which
    // carry no token.
    if request.uri().path() == "/actuator/health"
        || request.uri().path().starts_with("/actuator/health/")
    {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    // Prometheus's static credential opens the scrape endpoint and nothing else.
    if parts.uri.path() == "/actuator/prometheus"
        && let (Some(expected), Some(given)) = (
            gateway.metrics_token.as_deref(),
            shared::auth::bearer(&parts),
        )
        && bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            given.as_bytes(),
        ))
    {
        return next.run(Request::from_parts(parts, body)).await;
    }
    if let Err(e) = gateway.verifier.verify_request(&parts).await {
        return e.into_response();
    }
    next.run(Request::from_parts(parts, body)).await
}

/// A valid token with the `admin` role.
async fn require_admin(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    match gateway.verifier.verify_request(&parts).await {
        Err(e) => e.into_response(),
        Ok(claims) if !claims.is_admin() => {
            Problem::forbidden("This endpoint needs the admin role.").into_response()
        }
        Ok(_) => next.run(Request::from_parts(parts, body)).await,
    }
}

/// `POST /actuator/gateway/refresh`: reload the routes now.
async fn refresh(State(gateway): State<Arc<Gateway>>) -> Result<Json<Value>, Problem> {
    match gateway.reload() {
        Ok(routes) => Ok(Json(json!({ "routes": routes }))),
        Err(reason) => Err(Problem::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!("The new routes were refused and the previous ones stay in force: {reason}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_no_instance_has_any_more_are_unpinned() {
        let pins = Pins::default();
        pins.pin("a.internal", std::net::Ipv4Addr::LOCALHOST.into());
        pins.pin("b.internal", std::net::Ipv4Addr::LOCALHOST.into());
        pins.forget_departed(&std::collections::HashSet::from(["b.internal"]));
        assert_eq!(pins.get("a.internal"), None);
        assert!(pins.get("b.internal").is_some());
    }

    /// An instance on its secure port is dialled by its registered name, which its
    /// certificate must name, at the address discovery checked and pinned: never at
    /// what DNS says when connecting. Here DNS knows no such name (`.invalid` never
    /// resolves), so only the pin leads there.
    #[tokio::test]
    async fn a_pinned_name_is_dialled_at_its_checked_address_and_verified_by_name() {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        const NAME: &str = "secure.storefront.invalid";
        let dir = tempfile::tempdir().expect("dir");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write");
        let key = KeyPair::generate().expect("key");
        let certificate = CertificateParams::new(vec![NAME.to_owned()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("signed");
        let files = shared::tls::ServerTlsSettings {
            certificate_file: dir.path().join("instance.crt"),
            key_file: dir.path().join("instance.key"),
        };
        std::fs::write(&files.certificate_file, certificate.pem()).expect("write");
        std::fs::write(&files.key_file, key.serialize_pem()).expect("write");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = CancellationToken::new();
        let acceptor = shared::tls::server_acceptor(&files).expect("acceptor");
        let serving = stop.clone();
        tokio::spawn(async move {
            let app = Router::new().fallback(|| async { "instance" });
            shared::server::serve(listener, app, serving, &Default::default(), Some(acceptor)).await
        });
        let _stop = stop.drop_guard();

        let pins = Pins::default();
        let client = upstream_client(
            &UpstreamSettings::default(),
            shared::tls::client_config(&[ca_file]).expect("tls"),
            &pins,
        );
        let get = |name: &str| {
            axum::http::Request::get(format!("https://{name}:{port}/"))
                .body(axum::body::Body::empty())
                .expect("request")
        };
        let unpinned =
            tokio::time::timeout(Duration::from_secs(10), client.request(get(NAME))).await;
        assert!(
            !matches!(unpinned, Ok(Ok(_))),
            "without its pin the name leads nowhere"
        );

        pins.pin(NAME, std::net::Ipv4Addr::LOCALHOST.into());
        let response = tokio::time::timeout(Duration::from_secs(10), client.request(get(NAME)))
            .await
            .expect("in time")
            .expect("reached through its pin, its certificate checked against its name");
        assert_eq!(response.status(), axum::http::StatusCode::OK);

        // Another name pinned to the same address is refused: the certificate names
        // only the instance's own.
        const OTHER: &str = "other.storefront.invalid";
        pins.pin(OTHER, std::net::Ipv4Addr::LOCALHOST.into());
        let other = tokio::time::timeout(Duration::from_secs(10), client.request(get(OTHER)))
            .await
            .expect("in time");
        let said = format!("{other:?}");
        assert!(
            other.is_err() && said.contains("NotValidForName"),
            "a certificate for another name is refused: {said}"
        );
    }
}
