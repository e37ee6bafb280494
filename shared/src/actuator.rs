//! The actuator routes every process serves, in Spring Boot's shape:
//! `/actuator` (the index of the others), `/actuator/health` (UP, or 503 DOWN when a
//! dependency the process needs is down, with each dependency's state) with its probe
//! groups `/actuator/health/liveness` (the process answers) and
//! `/actuator/health/readiness` (it can serve: every dependency is up),
//! `/actuator/info` (name, version, build), `/actuator/prometheus`, and
//! `/actuator/loggers` (read every logger's level; operators change one at run time).
//!
//! Metrics go through the `metrics` facade into one Prometheus recorder per process,
//! installed on first use, so every crate can record with `metrics::counter!` and the
//! exposition shows them all.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::{Value, json};

/// The result of one dependency check: `Err` carries a short, secret-free reason.
pub type CheckResult = Result<(), String>;
type CheckFuture = Pin<Box<dyn Future<Output = CheckResult> + Send>>;
type Check = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// Decides whether a request comes from an operator (who may change log levels):
/// `Err` is the problem to answer instead (401 without credentials, 403 with others').
pub type OperatorGate = Arc<
    dyn Fn(
            axum::http::HeaderMap,
        ) -> Pin<Box<dyn Future<Output = Result<(), crate::Problem>> + Send>>
        + Send
        + Sync,
>;

/// How long one dependency may take to answer before it counts as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the actuator reports for one process.
#[derive(Clone)]
pub struct Actuator {
    info: Value,
    checks: BTreeMap<String, Check>,
    operators: Option<OperatorGate>,
    on_scrape: Vec<Arc<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Actuator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Actuator")
            .field("info", &self.info)
            .field("checks", &self.checks.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Actuator {
    /// An actuator for the process `name` at `version`.
    pub fn new(name: &str, version: &str) -> Self {
        // Install the recorder now: anything recorded before it exists is lost.
        prometheus_handle();
        Self {
            info: json!({
                "app": { "name": name, "version": version },
                "build": {
                    "artifact": name,
                    "name": name,
                    "group": "storefront",
                    "version": version,
                },
            }),
            checks: BTreeMap::new(),
            operators: None,
            on_scrape: Vec::new(),
        }
    }

    /// The actuator of a service that owns a database and verifies our tokens: health
    /// checks the database, the scrape carries its pool's gauges, and admins are its
    /// operators.
    #[cfg(feature = "postgres")]
    pub fn for_service(
        name: &str,
        version: &str,
        pool: &sqlx::PgPool,
        verifier: Arc<crate::auth::JwtVerifier>,
    ) -> Self {
        let checked = pool.clone();
        let scraped = pool.clone();
        Self::new(name, version)
            .operators(crate::auth::admin_gate(verifier))
            .check("db", move || crate::db::check(checked.clone()))
            .on_scrape(move || crate::db::record_pool(&scraped, "main"))
    }

    /// Adds a key to `/actuator/info`.
    pub fn info(mut self, key: &str, value: Value) -> Self {
        if let Some(map) = self.info.as_object_mut() {
            map.insert(key.to_owned(), value);
        }
        self
    }

    /// Adds a dependency the process needs; when it fails, health is DOWN (503).
    pub fn check<F, Fut>(mut self, component: &str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = CheckResult> + Send + 'static,
    {
        self.checks
            .insert(component.to_owned(), Arc::new(move || Box::pin(check())));
        self
    }

    /// Runs `record` before each scrape, to set gauges read from elsewhere (a
    /// database pool's connections).
    pub fn on_scrape(mut self, record: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_scrape.push(Arc::new(record));
        self
    }

    /// Who may change log levels; without a gate nobody may (403).
    pub fn operators(mut self, gate: OperatorGate) -> Self {
        self.operators = Some(gate);
        self
    }

    /// The `/actuator/*` routes.
    pub fn router<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        let state = Arc::new(self);
        Router::new()
            .route("/actuator", get(index))
            .route("/actuator/health", get(health))
            .route("/actuator/health/liveness", get(liveness))
            .route("/actuator/health/readiness", get(health))
            .route("/actuator/info", get(info))
            .route("/actuator/prometheus", get(prometheus))
            .route("/actuator/loggers", get(loggers))
            .route("/actuator/loggers/{name}", get(logger).post(set_logger))
            .with_state(state)
    }

    /// Runs every check concurrently, each bounded by a timeout.
    pub async fn health(&self) -> (StatusCode, Value) {
        let runs = self.checks.iter().map(|(name, check)| {
            let fut = check();
            async move {
                let result = match tokio::time::timeout(CHECK_TIMEOUT, fut).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
                };
                (name.clone(), result)
            }
        });
        let results = futures::future::join_all(runs).await;
        let mut components = serde_json::Map::new();
        let mut up = true;
        for (name, result) in results {
            let value = match result {
                Ok(()) => json!({ "status": "UP" }),
                Err(reason) => {
                    up = false;
                    json!({ "status": "DOWN", "details": { "error": reason } })
                }
            };
            components.insert(name, value);
        }
        let status = if up { "UP" } else { "DOWN" };
        let mut body = json!({ "status": status });
        if !components.is_empty() {
            body["components"] = Value::Object(components);
        }
        let code = if up {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (code, body)
    }
}

async fn health(State(actuator): State<Arc<Actuator>>) -> Response {
    let (code, mut body) = actuator.health().await;
    if code == StatusCode::OK {
        return Json(body).into_response();
    }
    // Every 5xx of the contract is problem+json; health keeps Spring's `"status":
    // "DOWN"` (the contract names it) and adds the problem fields beside it.
    body["type"] = json!("/problems/dependency-down");
    body["title"] = json!("Service Unavailable");
    body["detail"] =
        json!("A dependency this process needs is down, or it is still starting; see components.");
    let mut response = (code, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(crate::problem::CONTENT_TYPE),
    );
    response
}

/// `GET /actuator`: Spring Boot's index, a HAL `_links` map of every endpoint.
async fn index(headers: header::HeaderMap) -> Json<Value> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        });
    let base = host.map_or_else(
        || "/actuator".to_owned(),
        |h| format!("http://{h}/actuator"),
    );
    let link = |path: &str, templated: bool| json!({ "href": format!("{base}{path}"), "templated": templated });
    Json(json!({ "_links": {
        "self": link("", false),
        "health": link("/health", false),
        "health-path": link("/health/{*path}", true),
        "info": link("/info", false),
        "prometheus": link("/prometheus", false),
        "loggers": link("/loggers", false),
        "loggers-name": link("/loggers/{name}", true),
    }}))
}

/// `GET /actuator/health/liveness`: UP while the process answers at all. It checks
/// no dependency, so an orchestrator never restarts a process for a database outage.
async fn liveness() -> Json<Value> {
    Json(json!({ "status": "UP" }))
}

/// `GET /actuator/loggers`, in Spring Boot's shape.
async fn loggers() -> Response {
    let Some(levels) = crate::telemetry::levels() else {
        return unmanaged();
    };
    Json(json!({
        "levels": crate::telemetry::LEVEL_NAMES,
        "loggers": levels.all(),
        "groups": {},
    }))
    .into_response()
}

/// `GET /actuator/loggers/{name}`: `ROOT` or a tracing target.
async fn logger(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    let Some(levels) = crate::telemetry::levels() else {
        return unmanaged();
    };
    if !crate::telemetry::is_logger_name(&name) {
        return bad_logger_name();
    }
    Json(levels.get(&name)).into_response()
}

/// The body of `POST /actuator/loggers/{name}`; a null or absent level removes the
/// logger's own level.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SetLevel {
    #[serde(default)]
    configured_level: Option<String>,
}

/// The most a level change may send: `{"configuredLevel": "DEBUG"}` is 28 bytes.
const MAX_SET_LEVEL_BYTES: usize = 1024;

/// `POST /actuator/loggers/{name}` (operators): 204 once the level applies.
async fn set_logger(
    State(actuator): State<Arc<Actuator>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    request: axum::extract::Request,
) -> Response {
    let Some(gate) = actuator.operators.clone() else {
        return crate::Problem::forbidden("No operator credential is configured for this process.")
            .into_response();
    };
    // The credential first, the body after: whoever has none gets nothing read.
    let (parts, body) = request.into_parts();
    if let Err(problem) = gate(parts.headers).await {
        return problem.into_response();
    }
    let body = match axum::body::to_bytes(body, MAX_SET_LEVEL_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            return match crate::server::BodyFailure::of(&e) {
                crate::server::BodyFailure::TooLarge => crate::Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "Send at most {MAX_SET_LEVEL_BYTES} bytes: {{\"configuredLevel\": \"DEBUG\"}}."
                    ),
                ),
                _ => crate::Problem::bad_request(format!("The body could not be read: {e}.")),
            }
            .into_response();
        }
    };
    let Some(levels) = crate::telemetry::levels() else {
        return unmanaged();
    };
    if !crate::telemetry::is_logger_name(&name) {
        return bad_logger_name();
    }
    let request: SetLevel = if body.is_empty() {
        SetLevel {
            configured_level: None,
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return crate::Problem::validation(vec![crate::FieldError::new(
                    "configuredLevel",
                    format!("send {{\"configuredLevel\": \"DEBUG\"}} or null ({e})"),
                )])
                .into_response();
            }
        }
    };
    match levels.set(&name, request.configured_level.as_deref()) {
        Ok(()) => {
            tracing::info!(logger = %name, level = ?request.configured_level, "log level changed");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(message) => {
            crate::Problem::validation(vec![crate::FieldError::new("configuredLevel", message)])
                .into_response()
        }
    }
}

fn unmanaged() -> Response {
    crate::Problem::new(
        StatusCode::NOT_FOUND,
        "This process's log levels are not managed here (its subscriber was installed elsewhere).",
    )
    .into_response()
}

fn bad_logger_name() -> Response {
    crate::Problem::bad_request(
        "A logger is ROOT or a tracing target such as order_service::orders (letters, digits, _, - and ::).",
    )
    .into_response()
}

async fn info(State(actuator): State<Arc<Actuator>>) -> Json<Value> {
    Json(actuator.info.clone())
}

async fn prometheus(State(actuator): State<Arc<Actuator>>) -> Response {
    crate::metrics::record_process();
    for record in &actuator.on_scrape {
        record();
    }
    let handle = prometheus_handle();
    handle.run_upkeep();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// The process's Prometheus recorder, installed on first use (every [`Actuator::new`]
/// makes sure of it, before the process records anything). If another recorder was
/// installed first, metrics still render from a private recorder's handle so the
/// endpoint keeps answering.
///
/// A thread drains recorded histogram samples into their summaries every
/// [`UPKEEP_INTERVAL`]. Without it every sample stays in memory until the next scrape,
/// and a process nobody scrapes grows with every request it serves.
pub fn prometheus_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // Every duration is a histogram with buckets, as dashboards built on
        // Micrometer's `percentiles-histogram` expect, not a summary.
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                &crate::metrics::BUCKETS,
            )
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        let upkept = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkept.run_upkeep();
                    UPKEEPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no metrics upkeep thread; histograms are drained only by scrapes");
        }
        handle
    })
}

/// How often recorded histogram samples are folded into their summaries.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static UPKEEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many upkeeps have run in this process.
pub fn upkeeps() -> u64 {
    UPKEEPS.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_samples_are_drained_without_a_scrape() {
        let _ = prometheus_handle();
        let before = upkeeps();
        metrics::histogram!("upkeep_test_seconds").record(0.25);
        let deadline = std::time::Instant::now() + UPKEEP_INTERVAL * 3;
        while upkeeps() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no upkeep ran within {:?}",
                UPKEEP_INTERVAL * 3
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[tokio::test]
    async fn health_is_up_without_checks() {
        let (code, body) = Actuator::new("t", "0").health().await;
        assert_eq!(code, StatusCode::OK);
        assert_eq!(body["status"], "UP");
    }

    #[tokio::test]
    async fn a_failing_dependency_makes_health_down_with_its_reason() {
        let actuator = Actuator::new("t", "0")
            .check("db", || async { Ok(()) })
            .check("kafka", || async { Err("broker unreachable".to_owned()) });
        let (code, body) = actuator.health().await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "DOWN");
        assert_eq!(body["components"]["db"]["status"], "UP");
        assert_eq!(body["components"]["kafka"]["status"], "DOWN");
        assert_eq!(
            body["components"]["kafka"]["details"]["error"],
            "broker unreachable"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_dependency_counts_as_down() {
        let actuator = Actuator::new("t", "0").check("slow", || async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let (code, body) = actuator.health().await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body["components"]["slow"]["details"]["error"]
                .as_str()
                .unwrap_or_default()
                .contains("no answer")
        );
    }
}
