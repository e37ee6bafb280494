//! The native JSON API under `/api/v1` (documented in `docs/registry.md`).
//!
//! Besides register, heartbeat, deregister, status and override, it offers two ways
//! to follow changes: a blocking query (`?index=N&wait=30s` on a list returns as soon
//! as the table's index passes N, Consul style) and a server-sent-event stream
//! (`/api/v1/watch`) that pushes every change the moment the table publishes it.

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Path, Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post, put},
};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use shared::{FieldError, Problem};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};

use crate::{
    leases::{Change, Instance, LeaseError, LeaseTable, Snapshot, now_ms},
    model::{EurekaDetails, Registration, ServiceName, Status},
};

/// Longest a blocking query may wait.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Leases beyond a day are a mistake, not a preference: refused rather than clamped.
pub const ABSURD_LEASE_SECONDS: u32 = 86_400;

pub fn router(table: Arc<LeaseTable>) -> Router {
    Router::new()
        .route("/api/v1/services", get(list_services))
        .route("/api/v1/state", get(state))
        .route("/api/v1/watch", get(watch))
        .route(
            "/api/v1/services/{service}/instances",
            post(register).get(list_instances),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}",
            get(get_instance).delete(deregister),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}/heartbeat",
            put(heartbeat),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}/status",
            put(set_status),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}/override",
            put(set_override).delete(clear_override),
        )
        .with_state(table)
}

/// An instance as the native API shows it.
pub fn instance_json(instance: &Instance, now: u64) -> Value {
    let r = &instance.registration;
    json!({
        "service": r.service.as_str(),
        "instanceId": r.instance_id,
        "host": r.host,
        "port": r.port,
        "securePort": r.eureka.secure_port.filter(|_| r.eureka.secure_port_enabled),
        "address": r.address(),
        "status": instance.status(),
        "reportedStatus": r.status,
        "overrideStatus": instance.override_status,
        "healthUrl": r.health_url,
        "metadata": r.metadata,
        "leaseSeconds": r.lease_seconds,
        "registeredAt": instance.registered_at,
        "lastRenewalAt": instance.clock.last_renewal(),
        "leaseExpiresAt": instance.expires_at(),
        "leaseRemainingMs": instance.expires_at().saturating_sub(now),
    })
}

/// A change as watchers receive it.
pub fn change_json(change: &Change, now: u64) -> Value {
    json!({
        "index": change.index,
        "at": change.at,
        "action": change.action,
        "cause": change.cause,
        "instance": instance_json(&change.instance, now),
    })
}

/// The self-preservation and renewal figures the dashboard and `/api/v1/state` show.
pub fn state_json(table: &LeaseTable, snapshot: &Snapshot, now: u64) -> Value {
    let preservation = snapshot.preservation.as_ref().map(|p| {
        json!({
            "since": p.since,
            "until": p.until,
            "expiredInWindow": p.expired_in_window,
            "instances": p.instances,
            "threshold": p.threshold,
            "windowSeconds": p.window_seconds,
            "reason": p.reason(),
        })
    });
    json!({
        "index": snapshot.index,
        "instances": snapshot.all(now).count(),
        "renewalsLastMinute": table.renewals_last_minute(now),
        "selfPreservation": preservation,
        "lastSelfPreservationEnd": snapshot.last_preservation_end.map(|(at, why)| json!({"at": at, "why": why})),
        "watchers": table.watchers(),
        "node": table.node(),
        "ready": table.is_ready(),
        "peers": table.peers(),
    })
}

pub fn service_name(raw: &str) -> Result<ServiceName, Problem> {
    ServiceName::parse(raw)
        .map_err(|message| Problem::validation(vec![FieldError::new("service", message)]))
}

impl From<LeaseError> for Problem {
    fn from(error: LeaseError) -> Self {
        Problem::not_found(error.to_string())
    }
}

fn with_index(index: u64, body: Value) -> Response {
    let mut response = Json(body).into_response();
    if let Ok(value) = HeaderValue::from_str(&index.to_string()) {
        response.headers_mut().insert("x-registry-index", value);
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RegisterBody {
    instance_id: Option<String>,
    host: String,
    port: u32,
    health_url: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    lease_seconds: Option<u32>,
    status: Option<String>,
    /// The port that serves TLS, when the instance has one: routers then reach it
    /// there over `https`, as Eureka's `securePort` with `@enabled`.
    secure_port: Option<u32>,
}

async fn register(
    State(table): State<Arc<LeaseTable>>,
    Path(service): Path<String>,
    shared::http::Json(body): shared::http::Json<RegisterBody>,
) -> Result<Response, Problem> {
    let service = service_name(&service)?;
    let mut errors = Vec::new();
    // Out of range becomes 0, which validation reports as the port's error.
    let port = u16::try_from(body.port).unwrap_or(0);
    let status = match body.status.as_deref() {
        None => Status::Up,
        Some(raw) => raw.parse().unwrap_or_else(|message| {
            errors.push(FieldError::new("status", message));
            Status::Up
        }),
    };
    let lease_seconds = lease_field(&table, body.lease_seconds, "leaseSeconds", &mut errors);
    let secure_port = match body.secure_port {
        None => None,
        Some(p) => match u16::try_from(p) {
            Ok(p) if p > 0 => Some(p),
            _ => {
                errors.push(FieldError::new("securePort", "must be a port, 1 to 65535"));
                None
            }
        },
    };
    let registration = Registration {
        instance_id: body
            .instance_id
            .unwrap_or_else(|| format!("{}:{}:{}", body.host, service, body.port)),
        service,
        host: body.host,
        port,
        status,
        lease_seconds,
        health_url: body.health_url,
        metadata: body.metadata,
        eureka: EurekaDetails {
            secure_port,
            secure_port_enabled: secure_port.is_some(),
            ..EurekaDetails::default()
        },
    };
    if let Err(more) = registration.validate() {
        errors.extend(more);
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let now = now_ms();
    table
        .check_capacity(&registration.service, &registration.instance_id, now)
        .map_err(|cap| full(&registration.service, cap))?;
    let instance = table.register(registration, now);
    let location = format!(
        "/api/v1/services/{}/instances/{}",
        instance.registration.service, instance.registration.instance_id
    );
    let mut response = (StatusCode::CREATED, Json(instance_json(&instance, now))).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// The lease a request asks for: absent means the default, absurd values are refused
/// naming `field`, anything else is clamped to the configured bounds.
pub fn lease_field(
    table: &LeaseTable,
    requested: Option<u32>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> u32 {
    match requested {
        Some(0) => {
            errors.push(FieldError::new(field, "must be at least 1 second"));
            table.clamp_lease(None)
        }
        Some(s) if s > ABSURD_LEASE_SECONDS => {
            errors.push(FieldError::new(
                field,
                format!("must be at most {ABSURD_LEASE_SECONDS} seconds (one day)"),
            ));
            table.clamp_lease(None)
        }
        other => table.clamp_lease(other),
    }
}

async fn heartbeat(
    State(table): State<Arc<LeaseTable>>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    let service = service_name(&service)?;
    let now = now_ms();
    let instance = table.renew(&service, &id, now)?;
    Ok(Json(json!({
        "leaseExpiresAt": instance.expires_at(),
        "leaseSeconds": instance.registration.lease_seconds,
        "status": instance.status(),
    })))
}

async fn deregister(
    State(table): State<Arc<LeaseTable>>,
    Path((service, id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    let service = service_name(&service)?;
    table.deregister(&service, &id, now_ms())?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StatusBody {
    status: String,
}

fn settable(raw: &str) -> Result<Status, Problem> {
    match raw.parse::<Status>() {
        Ok(Status::Unknown) | Err(_) => Err(Problem::validation(vec![FieldError::new(
            "status",
            format!("must be {}", Status::SETTABLE),
        )])),
        Ok(status) => Ok(status),
    }
}

async fn set_status(
    State(table): State<Arc<LeaseTable>>,
    Path((service, id)): Path<(String, String)>,
    shared::http::Json(body): shared::http::Json<StatusBody>,
) -> Result<Json<Value>, Problem> {
    let service = service_name(&service)?;
    let status = settable(&body.status)?;
    let now = now_ms();
    let instance = table.set_status(&service, &id, status, now)?;
    Ok(Json(instance_json(&instance, now)))
}

async fn set_override(
    State(table): State<Arc<LeaseTable>>,
    Path((service, id)): Path<(String, String)>,
    shared::http::Json(body): shared::http::Json<StatusBody>,
) -> Result<Json<Value>, Problem> {
    let service = service_name(&service)?;
    let status = settable(&body.status)?;
    let now = now_ms();
    let instance = table.set_override(&service, &id, Some(status), now)?;
    Ok(Json(instance_json(&instance, now)))
}

async fn clear_override(
    State(table): State<Arc<LeaseTable>>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    let service = service_name(&service)?;
    let now = now_ms();
    let instance = table.set_override(&service, &id, None, now)?;
    Ok(Json(instance_json(&instance, now)))
}

async fn get_instance(
    State(table): State<Arc<LeaseTable>>,
    Path((service, id)): Path<(String, String)>,
) -> Result<Json<Value>, Problem> {
    let service = service_name(&service)?;
    let now = now_ms();
    let snapshot = table.snapshot();
    let instance = snapshot.instance(&service, &id, now).ok_or_else(|| {
        Problem::not_found(format!("no instance {id} of {service} is registered"))
    })?;
    Ok(Json(instance_json(instance, now)))
}

async fn list_services(
    State(table): State<Arc<LeaseTable>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, Response> {
    let wait = Blocking::parse(&params).map_err(IntoResponse::into_response)?;
    let _place = wait.admit(&table, client)?;
    let snapshot = wait.until_changed(&table).await;
    let now = now_ms();
    let services: Vec<Value> = snapshot
        .services
        .keys()
        .filter_map(|name| {
            let instances: Vec<&Arc<Instance>> = snapshot.instances(name, now).collect();
            (!instances.is_empty()).then(|| {
                json!({
                    "name": name.as_str(),
                    "instances": instances.len(),
                    "up": instances.iter().filter(|i| i.status() == Status::Up).count(),
                })
            })
        })
        .collect();
    Ok(with_index(
        snapshot.index,
        json!({ "index": snapshot.index, "services": services }),
    ))
}

async fn list_instances(
    State(table): State<Arc<LeaseTable>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path(service): Path<String>,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Response, Response> {
    let service = service_name(&service).map_err(IntoResponse::into_response)?;
    let wait = Blocking::parse(&params).map_err(IntoResponse::into_response)?;
    let mut statuses = Vec::new();
    let mut metadata = Vec::new();
    for (key, value) in &params {
        if key == "status" {
            for raw in value.split(',') {
                statuses.push(raw.parse::<Status>().map_err(|message| {
                    Problem::validation(vec![FieldError::new("status", message)]).into_response()
                })?);
            }
        } else if let Some(meta_key) = key.strip_prefix("meta.") {
            metadata.push((meta_key.to_owned(), value.clone()));
        } else if !matches!(key.as_str(), "index" | "wait" | "node" | "digest") {
            return Err(Problem::bad_request(format!(
                "Unknown query parameter `{key}`: use status, meta.<key>, index, wait, node or \
                 digest."
            ))
            .into_response());
        }
    }
    let _place = wait.admit(&table, client)?;
    let selected = |snapshot: &Snapshot, now: u64| -> Vec<Arc<Instance>> {
        snapshot
            .instances(&service, now)
            .filter(|i| statuses.is_empty() || statuses.contains(&i.status()))
            .filter(|i| {
                metadata
                    .iter()
                    .all(|(k, v)| i.registration.metadata.get(k) == Some(v))
            })
            .cloned()
            .collect()
    };
    let snapshot = match (&wait.digest, wait.foreign(&table)) {
        // Another node's index means nothing here, but the list the client holds
        // does: wait until this node's list differs from it. A balancer in front of
        // the peers then costs no busy loop, and a failover misses nothing.
        (Some(held), true) => {
            let deadline = tokio::time::Instant::now() + wait.wait;
            let mut index = table.watch_index();
            loop {
                let snapshot = table.snapshot();
                if digest(&selected(&snapshot, now_ms())) != *held {
                    break snapshot;
                }
                let seen = snapshot.index;
                let changed = tokio::select! {
                    r = tokio::time::timeout_at(deadline, index.wait_for(|&i| i > seen)) => r.is_ok_and(|r| r.is_ok()),
                    () = table.closed() => false,
                };
                if !changed {
                    break table.snapshot();
                }
            }
        }
        _ => wait.until_changed(&table).await,
    };
    let now = now_ms();
    let chosen = selected(&snapshot, now);
    let instances: Vec<Value> = chosen.iter().map(|i| instance_json(i, now)).collect();
    let mut response = with_index(
        snapshot.index,
        json!({ "index": snapshot.index, "service": service.as_str(), "instances": instances }),
    );
    if let Ok(value) = HeaderValue::from_str(&digest(&chosen)) {
        response.headers_mut().insert("x-registry-digest", value);
    }
    Ok(response)
}

/// A list's fingerprint, the same on every peer that holds the same versions: each
/// instance's id and dirty stamp (lease timings left out: they move with every
/// heartbeat).
fn digest(instances: &[Arc<Instance>]) -> String {
    // FNV-1a: the same on every node, whatever its build.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for instance in instances {
        feed(instance.registration.instance_id.as_bytes());
        feed(&[0]);
        feed(&instance.dirty.to_le_bytes());
    }
    format!("{hash:016x}")
}

async fn state(State(table): State<Arc<LeaseTable>>) -> Json<Value> {
    let snapshot = table.snapshot();
    Json(state_json(&table, &snapshot, now_ms()))
}

/// A blocking query's `index` and `wait`.
#[derive(Debug, Clone)]
struct Blocking {
    index: Option<u64>,
    wait: Duration,
    /// The node whose index `index` is; another node answers at once, since its
    /// indexes count its own changes.
    node: Option<String>,
    /// The fingerprint of the list the client holds (`X-Registry-Digest`).
    digest: Option<String>,
}

impl Blocking {
    fn parse(params: &[(String, String)]) -> Result<Self, Problem> {
        let mut blocking = Blocking {
            index: None,
            wait: Duration::from_secs(30),
            node: None,
            digest: None,
        };
        for (key, value) in params {
            match key.as_str() {
                "index" => {
                    blocking.index = Some(value.parse().map_err(|_| {
                        Problem::validation(vec![FieldError::new(
                            "index",
                            "must be a whole number",
                        )])
                    })?);
                }
                "wait" => blocking.wait = parse_wait(value)?,
                "node" => blocking.node = Some(value.clone()),
                "digest" => blocking.digest = Some(value.clone()),
                _ => {}
            }
        }
        Ok(blocking)
    }

    /// Room to wait in, for a query that may wait (one with an `index`).
    fn admit(
        &self,
        table: &LeaseTable,
        client: SocketAddr,
    ) -> Result<Option<crate::watchers::Place>, Response> {
        match self.index {
            Some(_) => table
                .admit_watcher(client.ip())
                .map(Some)
                .map_err(IntoResponse::into_response),
            None => Ok(None),
        }
    }

    /// Whether the index is another node's.
    fn foreign(&self, table: &LeaseTable) -> bool {
        self.node.as_deref().is_some_and(|n| n != table.node())
    }

    /// The current snapshot, once its index has passed the requested one (or the
    /// wait ran out, or no index was given).
    async fn until_changed(self, table: &LeaseTable) -> Arc<Snapshot> {
        let Some(seen) = self.index else {
            return table.snapshot();
        };
        if self.foreign(table) {
            return table.snapshot();
        }
        let mut index = table.watch_index();
        tokio::select! {
            _ = tokio::time::timeout(self.wait, index.wait_for(|&i| i > seen)) => {}
            () = table.closed() => {}
        }
        table.snapshot()
    }
}

/// `30s`, `500ms`, `2m`, or plain seconds; at most five minutes.
fn parse_wait(raw: &str) -> Result<Duration, Problem> {
    let invalid = || {
        Problem::validation(vec![FieldError::new(
            "wait",
            "must be a duration such as 30s, 500ms or 2m, at most 5m",
        )])
    };
    let (number, unit) = raw
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| raw.split_at(i))
        .unwrap_or((raw, "s"));
    let n: u64 = number.parse().map_err(|_| invalid())?;
    let wait = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(invalid()),
    };
    if wait > MAX_WAIT {
        return Err(invalid());
    }
    Ok(wait)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WatchParams {
    service: Option<String>,
}

/// Server-sent events: first a `snapshot` of every matching instance, then a `change`
/// per change. A watcher that falls behind gets a fresh `snapshot` instead of the
/// changes it missed.
async fn watch(
    State(table): State<Arc<LeaseTable>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Query(params): Query<WatchParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let filter = params
        .service
        .as_deref()
        .map(service_name)
        .transpose()
        .map_err(IntoResponse::into_response)?;
    let place = table
        .admit_watcher(client.ip())
        .map_err(IntoResponse::into_response)?;
    // Subscribe before reading the snapshot, so no change falls between the two.
    let changes = BroadcastStream::new(table.subscribe());
    let first = snapshot_event(&table, filter.as_ref());
    let since = first.1;
    metrics::gauge!("registry_watchers").increment(1.0);
    let guard = WatcherGuard;
    let table_for_resync = table.clone();
    let stream =
        futures::stream::once(async move { Ok(first.0) }).chain(changes.filter_map(move |item| {
            let _keep = (&guard, &place);
            let event = match item {
                Ok(change) => {
                    let wanted = filter
                        .as_ref()
                        .is_none_or(|f| *f == change.instance.registration.service);
                    (wanted && change.index > since).then(|| {
                        Event::default()
                            .event("change")
                            .id(change.index.to_string())
                            .json_data(change_json(&change, now_ms()))
                            .unwrap_or_default()
                    })
                }
                Err(BroadcastStreamRecvError::Lagged(_)) => {
                    Some(snapshot_event(&table_for_resync, filter.as_ref()).0)
                }
            };
            futures::future::ready(event.map(Ok))
        }));
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

fn snapshot_event(table: &LeaseTable, filter: Option<&ServiceName>) -> (Event, u64) {
    let snapshot = table.snapshot();
    let now = now_ms();
    let instances: Vec<Value> = snapshot
        .all(now)
        .filter(|i| filter.is_none_or(|f| *f == i.registration.service))
        .map(|i| instance_json(i, now))
        .collect();
    let event = Event::default()
        .event("snapshot")
        .id(snapshot.index.to_string())
        .json_data(json!({ "index": snapshot.index, "instances": instances }))
        .unwrap_or_default();
    (event, snapshot.index)
}

/// Counts open watch streams in the `registry_watchers` gauge.
struct WatcherGuard;

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        metrics::gauge!("registry_watchers").decrement(1.0);
    }
}

/// The problem for a registration past a service's instance cap.
pub fn full(service: &ServiceName, cap: usize) -> Problem {
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!(
            "`{service}` already has {cap} instances, the most one service may have \
             (leases.max_instances_per_service); deregister some first."
        ),
    )
}
