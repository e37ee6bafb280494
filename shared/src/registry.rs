//! The registry client every service uses.
//!
//! - [`RegistryClient`] speaks the registry's native API and fails over across several
//!   registry URLs, sticking to the last one that answered.
//! - [`Membership`] keeps one instance registered: it registers the address the
//!   process really bound, heartbeats well inside the lease, registers again when a
//!   heartbeat answers 404 (the registry restarted and forgot it), and on shutdown
//!   marks itself `DRAINING`, waits for the drain period, and deregisters.
//! - [`Discovery`] is a local cache of other services' instances, fed by the
//!   registry's blocking queries so a change arrives within one round trip; while no
//!   registry answers it keeps serving the last instances it knew.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

pub use crate::networks::{InstanceNetworks, Refused};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The `registry` section of a service's settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    /// Register and heartbeat at all (tests of a lone service turn it off).
    pub enabled: bool,
    /// Registry base URLs, comma-separated, tried in order (`REGISTRY_URL`).
    pub urls: String,
    /// The registry's write token (`REGISTRY_TOKEN`); never logged.
    pub token: Option<String>,
    /// The lease to ask for.
    pub lease_seconds: u32,
    /// Host to register; by default the bound address, or 127.0.0.1 when bound to
    /// every interface.
    pub advertised_host: Option<String>,
    /// How long to stay `DRAINING` before deregistering, so routers stop first.
    pub drain_ms: u64,
    /// Extra metadata to register (zone, version...).
    pub metadata: BTreeMap<String, String>,
    /// CA certificates (PEM files) trusted for `https://` registry URLs besides the
    /// system's roots.
    pub ca_files: Vec<std::path::PathBuf>,
}

impl std::fmt::Debug for RegistrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySettings")
            .field("enabled", &self.enabled)
            .field("urls", &self.urls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("lease_seconds", &self.lease_seconds)
            .field("advertised_host", &self.advertised_host)
            .field("drain_ms", &self.drain_ms)
            .field("metadata", &self.metadata)
            .field("ca_files", &self.ca_files)
            .finish()
    }
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            urls: "http://127.0.0.1:8761".into(),
            token: None,
            lease_seconds: 10,
            advertised_host: None,
            drain_ms: 500,
            metadata: BTreeMap::new(),
            ca_files: Vec::new(),
        }
    }
}

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no registry answered ({0})")]
    Unreachable(String),
    #[error("the registry does not know this instance")]
    Unknown,
    #[error("the registry refused the request: {status} {detail}")]
    Refused { status: u16, detail: String },
    /// Every registry answered, none could serve it now (5xx: starting, or out of
    /// room for watches and blocking queries); ask again after `retry_after`.
    #[error("every registry is busy ({detail})")]
    Busy {
        detail: String,
        retry_after: Option<Duration>,
    },
}

/// An instance as discovery returns it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInstance {
    pub service: String,
    pub instance_id: String,
    pub host: String,
    pub port: u16,
    pub address: String,
    pub status: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The port serving TLS, when the instance registered one: reach it there, over
    /// `https`.
    #[serde(default, rename = "securePort")]
    pub secure_port: Option<u16>,
}

impl ServiceInstance {
    pub fn is_up(&self) -> bool {
        self.status == "UP"
    }
}

/// What one instance registers.
#[derive(Debug, Clone)]
pub struct InstanceRegistration {
    pub service: String,
    pub instance_id: String,
    pub host: String,
    pub port: u16,
    pub health_url: String,
    pub metadata: BTreeMap<String, String>,
    /// The port serving TLS, when the instance serves HTTPS.
    pub secure_port: Option<u16>,
}

impl InstanceRegistration {
    /// The registration of `service` listening on `bound`, per `settings`.
    pub fn for_bound(
        service: &str,
        bound: std::net::SocketAddr,
        settings: &RegistrySettings,
    ) -> Self {
        let host = settings.advertised_host.clone().unwrap_or_else(|| {
            if bound.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                bound.ip().to_string()
            }
        });
        let port = bound.port();
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Self {
            service: service.to_owned(),
            instance_id: format!("{service}-{host}-{port}"),
            health_url: format!("http://{address}/actuator/health"),
            host,
            port,
            metadata: settings.metadata.clone(),
            secure_port: None,
        }
    }

    /// The same, serving HTTPS on its port: routers reach it over `https`, and its
    /// health URL says so.
    pub fn secure(mut self) -> Self {
        self.secure_port = Some(self.port);
        if let Some(rest) = self.health_url.strip_prefix("http://") {
            self.health_url = format!("https://{rest}");
        }
        self
    }
}

/// The registry's native API, with failover across URLs.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    token: Option<String>,
    /// The index of the URL that answered last; tried first next time.
    preferred: Arc<AtomicUsize>,
}

impl RegistryClient {
    /// A client of the registries `settings` name; `https://` URLs are checked
    /// against the system's roots and `registry.ca_files`. A CA file that cannot be
    /// used is an error naming it.
    pub fn new(settings: &RegistrySettings) -> Result<Self, String> {
        let urls: Vec<String> = settings
            .urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let http = crate::tls::client_builder(&settings.ca_files)
            .map_err(|e| format!("registry.ca_files: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| format!("the registry client cannot be made: {e}"))?;
        Ok(Self {
            http,
            urls: Arc::new(urls),
            token: settings.token.clone().filter(|t| !t.is_empty()),
            preferred: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Sends to the preferred registry, then each other one, until one answers with
    /// anything but a connection failure or a 5xx.
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<reqwest::Response, RegistryError> {
        let count = self.urls.len();
        if count == 0 {
            return Err(RegistryError::Unreachable(
                "no registry URL configured".into(),
            ));
        }
        let start = self.preferred.load(Ordering::Relaxed) % count;
        let mut last_error = String::new();
        // Whether every registry answered (with a 5xx), and how long the last asked
        // to be left alone.
        let mut all_answered = true;
        let mut retry_after = None;
        for offset in 0..count {
            let index = (start + offset) % count;
            let url = format!("{}{path}", self.urls[index]);
            let mut request = self.http.request(method.clone(), &url).timeout(timeout);
            if let Some(token) = &self.token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) if !response.status().is_server_error() => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(response);
                }
                Ok(response) => {
                    last_error = format!("{}: {}", self.urls[index], response.status());
                    retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(|s| Duration::from_secs(s.min(60)));
                }
                Err(e) => {
                    all_answered = false;
                    last_error = format!("{}: {}", self.urls[index], connection_error(&e));
                }
            }
        }
        match all_answered {
            true => Err(RegistryError::Busy {
                detail: last_error,
                retry_after,
            }),
            false => Err(RegistryError::Unreachable(last_error)),
        }
    }

    pub async fn register(
        &self,
        registration: &InstanceRegistration,
        lease_seconds: u32,
    ) -> Result<(), RegistryError> {
        let body = json!({
            "instanceId": registration.instance_id,
            "host": registration.host,
            "port": registration.port,
            "healthUrl": registration.health_url,
            "metadata": registration.metadata,
            "leaseSeconds": lease_seconds,
            "securePort": registration.secure_port,
        });
        let path = format!("/api/v1/services/{}/instances", registration.service);
        let response = self
            .send(
                reqwest::Method::POST,
                &path,
                Some(&body),
                Duration::from_secs(5),
            )
            .await?;
        expect_success(response).await
    }

    pub async fn heartbeat(&self, service: &str, instance_id: &str) -> Result<(), RegistryError> {
        let path = format!("/api/v1/services/{service}/instances/{instance_id}/heartbeat");
        let response = self
            .send(reqwest::Method::PUT, &path, None, Duration::from_secs(5))
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(RegistryError::Unknown);
        }
        expect_success(response).await
    }

    pub async fn set_status(
        &self,
        service: &str,
        instance_id: &str,
        status: &str,
    ) -> Result<(), RegistryError> {
        let path = format!("/api/v1/services/{service}/instances/{instance_id}/status");
        let response = self
            .send(
                reqwest::Method::PUT,
                &path,
                Some(&json!({ "status": status })),
                Duration::from_secs(5),
            )
            .await?;
        expect_success(response).await
    }

    pub async fn deregister(&self, service: &str, instance_id: &str) -> Result<(), RegistryError> {
        let path = format!("/api/v1/services/{service}/instances/{instance_id}");
        let response = self
            .send(reqwest::Method::DELETE, &path, None, Duration::from_secs(5))
            .await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        expect_success(response).await
    }

    /// `service`'s instances; with `after`, waits (up to `wait`) until the registry's
    /// index passes it. Returns where the answer stands, for the next call.
    ///
    /// With registry peers, each node counts its own index: the cursor names the node
    /// it came from, and another node (the client failed over, or a balancer sent the
    /// call elsewhere) answers at once with its whole list rather than wait for an
    /// index of another node's count, so no change is missed across a failover.
    pub async fn instances(
        &self,
        service: &str,
        after: Option<&Cursor>,
        wait: Duration,
    ) -> Result<(Cursor, Vec<ServiceInstance>), RegistryError> {
        let path = match after {
            Some(Cursor {
                index,
                node,
                digest,
            }) => format!(
                "/api/v1/services/{service}/instances?index={index}&wait={}ms{}{}",
                wait.as_millis(),
                node.as_deref()
                    .map(|n| format!("&node={n}"))
                    .unwrap_or_default(),
                digest
                    .as_deref()
                    .map(|d| format!("&digest={d}"))
                    .unwrap_or_default()
            ),
            None => format!("/api/v1/services/{service}/instances"),
        };
        let response = self
            .send(
                reqwest::Method::GET,
                &path,
                None,
                wait + Duration::from_secs(5),
            )
            .await?;
        if !response.status().is_success() {
            return Err(refused(response).await);
        }
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric()))
                .map(str::to_owned)
        };
        let node = header("x-registry-node");
        let digest = header("x-registry-digest");
        #[derive(Deserialize)]
        struct Listing {
            index: u64,
            instances: Vec<ServiceInstance>,
        }
        let listing: Listing = response
            .json()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("unreadable answer: {e}")))?;
        Ok((
            Cursor {
                index: listing.index,
                node,
                digest,
            },
            listing.instances,
        ))
    }
}

/// Where a blocking query stands: the index of the answer, the registry node that
/// counted it, and the fingerprint of the list it held (so another node, behind a
/// balancer, waits until its own list differs instead of answering at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub index: u64,
    pub node: Option<String>,
    pub digest: Option<String>,
}

/// `name` in lower case, copied only when it has an upper-case letter: service names
/// are looked up on every routed request, and are lower case already.
fn lowercase(name: &str) -> std::borrow::Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

fn connection_error(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection refused"
    } else {
        "request failed"
    }
}

async fn expect_success(response: reqwest::Response) -> Result<(), RegistryError> {
    if response.status().is_success() {
        Ok(())
    } else {
        Err(refused(response).await)
    }
}

async fn refused(response: reqwest::Response) -> RegistryError {
    let status = response.status().as_u16();
    let detail = response
        .json::<Value>()
        .await
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned))
        .unwrap_or_default();
    RegistryError::Refused { status, detail }
}

/// One instance kept registered until shutdown.
#[derive(Debug)]
pub struct Membership {
    task: tokio::task::JoinHandle<()>,
    registered: watch::Receiver<bool>,
}

impl Membership {
    /// Starts keeping `registration` registered. When `shutdown` fires it drains and
    /// deregisters; [`Membership::left`] waits for that.
    pub fn start(
        client: RegistryClient,
        registration: InstanceRegistration,
        settings: &RegistrySettings,
        shutdown: CancellationToken,
    ) -> Self {
        let (registered_tx, registered) = watch::channel(false);
        let lease = settings.lease_seconds.max(1);
        // Three heartbeats per lease: one lost heartbeat never costs the lease.
        let interval = Duration::from_millis(u64::from(lease) * 1000 / 3);
        let drain = Duration::from_millis(settings.drain_ms);
        let task = tokio::spawn(async move {
            let service = registration.service.clone();
            let id = registration.instance_id.clone();
            let mut backoff = Duration::from_millis(200);
            let mut is_registered = false;
            loop {
                if !is_registered {
                    match client.register(&registration, lease).await {
                        Ok(()) => {
                            tracing::info!(%service, instance = %id, "registered");
                            is_registered = true;
                            backoff = Duration::from_millis(200);
                            let _ = registered_tx.send(true);
                        }
                        Err(e) => {
                            tracing::warn!(%service, error = %e, retry_in = ?backoff, "cannot register");
                        }
                    }
                }
                let pause = if is_registered { interval } else { backoff };
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => break,
                }
                if !is_registered {
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                match client.heartbeat(&service, &id).await {
                    Ok(()) => {}
                    Err(RegistryError::Unknown) => {
                        tracing::warn!(%service, instance = %id, "the registry forgot this instance; registering again");
                        is_registered = false;
                        let _ = registered_tx.send(false);
                    }
                    Err(e) => tracing::warn!(%service, error = %e, "heartbeat failed"),
                }
            }
            if is_registered {
                if let Err(e) = client.set_status(&service, &id, "DRAINING").await {
                    tracing::warn!(error = %e, "cannot mark this instance DRAINING");
                }
                tokio::time::sleep(drain).await;
                match client.deregister(&service, &id).await {
                    Ok(()) => tracing::info!(%service, instance = %id, "deregistered"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot deregister; the lease will expire")
                    }
                }
                let _ = registered_tx.send(false);
            }
        });
        Self { task, registered }
    }

    /// Waits until the registry has accepted the registration.
    pub async fn registered(&mut self) {
        let _ = self.registered.wait_for(|r| *r).await;
    }

    /// Waits until the membership has drained and deregistered after shutdown.
    pub async fn left(self) {
        let _ = self.task.await;
    }
}

/// A watch-fed cache of services' instances.
#[derive(Debug, Clone)]
pub struct Discovery {
    cache: Arc<ArcSwap<HashMap<String, Arc<Vec<ServiceInstance>>>>>,
    refused: Arc<ArcSwap<HashMap<String, Arc<Vec<Refused>>>>>,
    changes: watch::Receiver<u64>,
    failures: watch::Receiver<u64>,
    follower: Arc<Follower>,
}

/// What a new poller needs, so services can be followed after start-up.
#[derive(Debug)]
struct Follower {
    client: RegistryClient,
    shutdown: CancellationToken,
    followed: std::sync::Mutex<std::collections::HashSet<String>>,
    changes: Arc<watch::Sender<u64>>,
    failures: Arc<watch::Sender<u64>>,
    /// When set, only instances inside these networks are served.
    networks: Option<Arc<InstanceNetworks>>,
}

impl Discovery {
    /// Follows `services` (canonical names) until `shutdown`.
    pub fn start(client: RegistryClient, services: &[&str], shutdown: CancellationToken) -> Self {
        Self::start_within(client, services, shutdown, None)
    }

    /// [`Discovery::start`], serving only instances inside `networks` (when set); the
    /// others are listed by [`Discovery::refused`].
    pub fn start_within(
        client: RegistryClient,
        services: &[&str],
        shutdown: CancellationToken,
        networks: Option<Arc<InstanceNetworks>>,
    ) -> Self {
        let (changes_tx, changes) = watch::channel(0_u64);
        let (failures_tx, failures) = watch::channel(0_u64);
        let discovery = Self {
            cache: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            refused: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            changes,
            failures,
            follower: Arc::new(Follower {
                client,
                shutdown,
                followed: std::sync::Mutex::new(std::collections::HashSet::new()),
                changes: Arc::new(changes_tx),
                failures: Arc::new(failures_tx),
                networks,
            }),
        };
        for service in services {
            discovery.follow(service);
        }
        discovery
    }

    /// Starts following `service` too (a no-op when it already is).
    pub fn follow(&self, service: &str) {
        let service = service.to_ascii_lowercase();
        let follower = self.follower.clone();
        let fresh = follower
            .followed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service.clone());
        if !fresh {
            return;
        }
        let cache = self.cache.clone();
        let refused_cache = self.refused.clone();
        tokio::spawn(async move {
            let client = &follower.client;
            let shutdown = &follower.shutdown;
            let mut index: Option<Cursor> = None;
            let mut backoff = Duration::from_millis(100);
            loop {
                let poll = client.instances(&service, index.as_ref(), Duration::from_secs(30));
                let result = tokio::select! {
                    r = poll => r,
                    () = shutdown.cancelled() => return,
                };
                match result {
                    Ok((next, instances)) => {
                        backoff = Duration::from_millis(100);
                        index = Some(next);
                        let instances = match &follower.networks {
                            None => instances,
                            Some(networks) => {
                                let (admitted, refused) = networks.admit(instances).await;
                                let known = refused_cache.load().get(&service).cloned();
                                if known.as_deref().map(Vec::as_slice) != Some(&refused[..]) {
                                    for r in &refused {
                                        tracing::warn!(%service, instance = %r.instance.instance_id, reason = %r.reason, "instance refused: not routed to");
                                    }
                                    let refused = Arc::new(refused);
                                    refused_cache.rcu(|current| {
                                        let mut next = (**current).clone();
                                        next.insert(service.clone(), refused.clone());
                                        next
                                    });
                                }
                                admitted
                            }
                        };
                        let instances = Arc::new(instances);
                        let unchanged = cache.load().get(&service) == Some(&instances);
                        if !unchanged {
                            cache.rcu(|current| {
                                let mut next = (**current).clone();
                                next.insert(service.clone(), instances.clone());
                                next
                            });
                            follower.changes.send_modify(|n| *n += 1);
                        }
                    }
                    Err(e) => {
                        // Keep serving the last known instances; try again soon.
                        // A blocking query cut off (the registry node it waited on
                        // died) is asked again at once, of whichever node answers:
                        // with several peers the next one knows every change.
                        tracing::warn!(%service, error = %e, "discovery poll failed; keeping the last known instances");
                        follower.failures.send_modify(|n| *n += 1);
                        // A registry that answered it is busy (out of room for
                        // blocking queries, say) is not asked again at once: that
                        // would poll it in a loop. It is left alone as long as it asks.
                        let busy = match &e {
                            RegistryError::Busy { retry_after, .. } => {
                                Some(retry_after.unwrap_or(backoff))
                            }
                            _ => None,
                        };
                        if index.take().is_some() && busy.is_none() {
                            continue;
                        }
                        let pause = busy.map_or(backoff, |asked| asked.max(backoff));
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = shutdown.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    /// The last known instances of `service`, whatever their status.
    pub fn instances(&self, service: &str) -> Arc<Vec<ServiceInstance>> {
        self.cache
            .load()
            .get(lowercase(service).as_ref())
            .cloned()
            .unwrap_or_default()
    }

    /// The last known instances of every followed service.
    pub fn known(&self) -> Vec<Arc<Vec<ServiceInstance>>> {
        self.cache.load().values().cloned().collect()
    }

    /// The instances of `service` that are not served because they lie outside the
    /// configured networks, with the reason.
    pub fn refused(&self, service: &str) -> Arc<Vec<Refused>> {
        self.refused
            .load()
            .get(lowercase(service).as_ref())
            .cloned()
            .unwrap_or_default()
    }

    /// Wakes on every change of any followed service.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Counts polls that found no registry answering (for health and tests).
    pub fn failures(&self) -> watch::Receiver<u64> {
        self.failures.clone()
    }
}

/// Serves `router` on `listener` while keeping `service` registered (when
/// `settings.enabled`). On shutdown the instance first turns `DRAINING` and leaves the
/// registry, so routers stop sending it requests, and only then does the server stop
/// accepting and finish what is in flight.
pub async fn serve_registered(
    service: &str,
    server: crate::server::Server,
    settings: &RegistrySettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let bound = server.listener.local_addr()?;
    let secure = server.tls.is_some();
    serve_registered_by(service, bound, secure, settings, shutdown, |stop| {
        crate::server::serve(
            server.listener,
            server.router,
            stop,
            &server.limits,
            server.tls,
        )
    })
    .await
}

/// [`serve_registered`] for a server that is not one listener and one router (the
/// gateway's listener per core): `serve` runs it until the token it is given is
/// cancelled, which happens only once the instance has left the registry.
pub async fn serve_registered_by<F, Fut>(
    service: &str,
    bound: std::net::SocketAddr,
    secure: bool,
    settings: &RegistrySettings,
    shutdown: CancellationToken,
    serve: F,
) -> std::io::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<()>>,
{
    let membership = match settings.enabled {
        true => {
            let client = RegistryClient::new(settings)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let mut registration = InstanceRegistration::for_bound(service, bound, settings);
            if secure {
                registration = registration.secure();
            }
            Some(Membership::start(
                client,
                registration,
                settings,
                shutdown.clone(),
            ))
        }
        false => None,
    };
    let server_stop = CancellationToken::new();
    let stopper = server_stop.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        if let Some(membership) = membership {
            membership.left().await;
        }
        stopper.cancel();
    });
    serve(server_stop).await
}

/// [`serve_registered`], with background `workers` (an outbox relay, an event
/// consumer) that watch the same `shutdown`. Returns once the server stopped and every
/// worker finished what it had in flight, so offsets and outbox rows are settled
/// before the process exits.
pub async fn serve_registered_with_workers(
    service: &str,
    server: crate::server::Server,
    settings: &RegistrySettings,
    shutdown: CancellationToken,
    workers: Vec<futures::future::BoxFuture<'static, ()>>,
) -> std::io::Result<()> {
    // A JoinSet: if this future is dropped, the workers are aborted with it.
    let mut running = tokio::task::JoinSet::new();
    for worker in workers {
        running.spawn(worker);
    }
    let served = serve_registered(service, server, settings, shutdown.clone()).await;
    // If the server failed on its own, the workers stop too.
    shutdown.cancel();
    while let Some(done) = running.join_next().await {
        if let Err(e) = done {
            tracing::error!(error = %e, "a background worker panicked");
        }
    }
    served
}

/// The registry credential of `service`, derived from the operator's `token`:
/// `<service>.<hex HMAC-SHA256(token, service)>`. It lets its holder write instances
/// of that one service (register, renew, report status, deregister) and read; only
/// the operator's token changes other services or sets overrides. Deriving instead
/// of configuring one secret per service means the registry needs only the
/// operator's token, and rotating it rotates every service's credential.
pub fn service_credential(token: &str, service: &str) -> String {
    use hmac::Mac;
    let service = service.to_ascii_lowercase();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(b"storefront-registry-service:");
    mac.update(service.as_bytes());
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{service}.{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_ca_file_that_cannot_be_used_is_refused_by_name() {
        let settings = RegistrySettings {
            urls: "https://registry.internal:8761".into(),
            ca_files: vec!["/nonexistent/registry-ca.pem".into()],
            ..RegistrySettings::default()
        };
        let refused = RegistryClient::new(&settings).err().unwrap_or_default();
        assert!(
            refused.contains("registry.ca_files") && refused.contains("registry-ca.pem"),
            "{refused}"
        );
        assert!(RegistryClient::new(&RegistrySettings::default()).is_ok());
    }
}
