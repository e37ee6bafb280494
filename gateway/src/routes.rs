//! Routes in Spring Cloud Gateway's shape, compiled once into a [`RouteTable`] so the
//! request path never parses configuration.
//!
//! A route has an `id`, a `uri` (`lb://service-name`, resolved from the registry on
//! every request, or a fixed `http://host:port`), `predicates` that must all match, and
//! `filters` applied in order after the `default-filters`. Predicates and filters are
//! written as Spring writes them, either shortcut (`Path=/orders/**`) or in full
//! (`{name: Path, args: {patterns: /orders/**}}`). Routes match in `order`, then in
//! file order; the first match wins.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde::Deserialize;
use serde_json::Value;

/// A route file, as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouteFile {
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    #[serde(default)]
    pub default_filters: Vec<Value>,
}

/// One route, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    pub id: String,
    pub uri: String,
    #[serde(default)]
    pub predicates: Vec<Value>,
    #[serde(default)]
    pub filters: Vec<Value>,
    #[serde(default)]
    pub order: i32,
    /// Roles of which the caller needs one (empty: any authenticated caller).
    #[serde(default)]
    pub roles: Vec<String>,
    /// `round-robin` (default) or `least-outstanding`.
    #[serde(default)]
    pub balancer: crate::balancer::Balancing,
    /// Spring's per-route metadata: `response-timeout` and `connect-timeout` in ms.
    #[serde(default)]
    pub metadata: BTreeMap<String, Value>,
}

/// Where a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// A service from the registry, by canonical (lower-case) name.
    Service(String),
    /// A fixed `scheme://authority`.
    Fixed(String),
}

/// A request-matching condition.
#[derive(Debug, Clone)]
pub enum Predicate {
    Path(Vec<PathPattern>),
    Method(Vec<Method>),
    /// Header present, and matching the regex when given.
    Header(HeaderName, Option<regex::Regex>),
    /// Host patterns with `*` and `**` wildcards.
    Host(Vec<String>),
    /// Query parameter present, and matching the regex when given.
    Query(String, Option<regex::Regex>),
    /// Requests after, before or between instants (milliseconds since the epoch).
    After(u64),
    Before(u64),
    Between(u64, u64),
    /// A cookie by name whose value matches the regex.
    Cookie(String, regex::Regex),
    /// The client's address (the TCP peer) is in one of the networks.
    RemoteAddr(Vec<ipnet::IpNet>),
    /// The address the nearest proxy saw (the last `X-Forwarded-For` entry, else the
    /// peer) is in one of the networks.
    XForwardedRemoteAddr(Vec<ipnet::IpNet>),
    /// This route's share `[from, to)` of its weight group's traffic.
    Weight {
        group: String,
        from: f64,
        to: f64,
    },
}

/// What predicates judge a request by.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    pub peer: Option<std::net::IpAddr>,
    /// Milliseconds since the epoch.
    pub now_ms: u64,
    /// One random draw per request: every weight group of the request reads it, so a
    /// request falls in exactly one route of each group.
    pub draw: u64,
}

pub use crate::plan::{Dedupe, Filter};
use crate::plan::{HeaderEdit, PathEdit, QueryEdit, ResponseEdit};

/// Spring Cloud Gateway's `RewriteLocationResponseHeader`: an upstream that redirects
/// to `http://order-service:8081/orders/1` names an address the client cannot reach;
/// the client gets `http://<the Host it asked>/orders/1`.
#[derive(Debug, Clone)]
pub struct RewriteLocation {
    /// Whether a `/v1`-style segment right after the host is dropped.
    strip: StripVersion,
    /// The header rewritten (`Location` by default).
    header: HeaderName,
    /// The host put in; by default the request's own `Host`.
    host: Option<String>,
    /// `<scheme>://<host[:port]>[/vN]/<rest>`, with the schemes `protocols` allows.
    pattern: regex::Regex,
}

/// When `RewriteLocationResponseHeader` drops a version segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripVersion {
    Never,
    /// Unless the client's own path starts with one.
    AsInRequest,
    Always,
}

impl RewriteLocation {
    fn from_args(args: &BTreeMap<String, String>, vals: &[String]) -> Result<Self, String> {
        // Spring's shortcut order: stripVersion, locationHeaderName, hostValue, protocols.
        let arg = |name: &str, index: usize| {
            named_or_at(args, vals, name, index)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let strip = match arg("stripVersion", 0) {
            None | Some("AS_IN_REQUEST") => StripVersion::AsInRequest,
            Some("NEVER_STRIP") => StripVersion::Never,
            Some("ALWAYS_STRIP") => StripVersion::Always,
            Some(other) => {
                return Err(format!(
                    "stripVersion {other}: use NEVER_STRIP, AS_IN_REQUEST or ALWAYS_STRIP"
                ));
            }
        };
        let header = HeaderName::from_bytes(
            arg("locationHeaderName", 1)
                .unwrap_or("Location")
                .as_bytes(),
        )
        .map_err(|_| "locationHeaderName is not a header name".to_owned())?;
        let host = arg("hostValue", 2).map(str::to_owned);
        if let Some(host) = &host
            && HeaderValue::from_str(host).is_err()
        {
            return Err(format!("hostValue {host} cannot be put in a header"));
        }
        let protocols = arg("protocols", 3).unwrap_or("https?|ftps?");
        let pattern = regex::Regex::new(&format!(
            r"^(?P<scheme>(?:{protocols})://)(?P<host>[^:/]+(?::\d+)?)(?P<version>/v\d+)?(?P<rest>/.*)$"
        ))
        .map_err(|e| format!("protocols is not a valid regex: {e}"))?;
        Ok(Self {
            strip,
            header,
            host,
            pattern,
        })
    }

    /// Rewrites `headers`' location for a request that asked `host` for `path`.
    pub fn apply(&self, headers: &mut HeaderMap, host: Option<&str>, path: &str) {
        let Some(host) = self.host.as_deref().or(host) else {
            return;
        };
        let Some(location) = headers.get(&self.header).and_then(|v| v.to_str().ok()) else {
            return;
        };
        let Some(parts) = self.pattern.captures(location) else {
            return;
        };
        let versioned_request = path.starts_with("/v")
            && path[2..]
                .split('/')
                .next()
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && path[2..].contains('/');
        let strip = match self.strip {
            StripVersion::Never => false,
            StripVersion::Always => true,
            StripVersion::AsInRequest => !versioned_request,
        };
        let version = if strip {
            ""
        } else {
            parts.name("version").map_or("", |m| m.as_str())
        };
        let rewritten = format!("{}{host}{version}{}", &parts["scheme"], &parts["rest"]);
        if let Ok(value) = HeaderValue::from_str(&rewritten) {
            headers.insert(self.header.clone(), value);
        }
    }
}

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub id: String,
    pub uri: String,
    pub upstream: Upstream,
    pub predicates: Vec<Predicate>,
    /// The filters (defaults first), compiled into the request path's phases.
    pub plan: crate::plan::Plan,
    pub order: i32,
    pub roles: Vec<String>,
    pub balancing: crate::balancer::Balancing,
    /// From sending to the response's headers; the gateway's default when `None`.
    pub response_timeout: Option<std::time::Duration>,
    /// The round-robin position, per route.
    pub turn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub metrics: std::sync::Arc<RouteMetrics>,
    /// The predicates and filters (defaults first) as written, for the routes report.
    pub described: RouteDescription,
}

/// A route's predicates and filters in Spring's shortcut spelling, so the routes
/// report shows what the file says rather than the compiled form.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDescription {
    pub predicates: Vec<String>,
    pub filters: Vec<String>,
}

impl RouteDescription {
    /// The predicates joined as Spring Cloud Gateway's `predicate` field joins them.
    pub fn predicate(&self) -> String {
        match self.predicates.as_slice() {
            [one] => one.clone(),
            many => format!("({})", many.join(" && ")),
        }
    }
}

/// `value` (a predicate or filter in either spelling) as a shortcut `Name=a, b`.
fn describe(value: &Value) -> String {
    match name_and_args(value) {
        Ok((name, args)) if args.is_empty() => name,
        Ok((name, args)) if shortcut_form(&args) => {
            format!("{name}={}", values(&args).join(", "))
        }
        Ok((name, args)) => {
            let named: Vec<String> = args.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("{name}={}", named.join(", "))
        }
        Err(_) => value.to_string(),
    }
}

/// A route's request metrics, with their handles registered once per method and
/// status instead of looked up by name and labels on every request.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    requests: std::sync::RwLock<std::collections::HashMap<(&'static str, u16), metrics::Histogram>>,
}

impl RouteMetrics {
    /// `spring_cloud_gateway_requests_seconds`, labelled as Spring Cloud Gateway labels
    /// it (`routeId`, `routeUri`, `httpMethod`, `httpStatusCode`, `status`, `outcome`),
    /// for one request of route `id`.
    pub fn record(
        &self,
        id: &str,
        uri: &str,
        method: &Method,
        status: u16,
        elapsed: std::time::Duration,
    ) {
        let method = shared::metrics::method_label(method);
        let key = (method, status);
        let known = self
            .requests
            .read()
            .ok()
            .and_then(|timers| timers.get(&key).cloned());
        let timer = known.unwrap_or_else(|| {
            let timer = requests_timer(id, uri, method, status);
            if let Ok(mut timers) = self.requests.write() {
                timers.insert(key, timer.clone());
            }
            timer
        });
        timer.record(elapsed.as_secs_f64());
    }

    /// The same metric for a request no route matched (route `-`).
    pub fn record_unrouted(method: &Method, status: u16, elapsed: std::time::Duration) {
        let method = shared::metrics::method_label(method);
        requests_timer("-", "-", method, status).record(elapsed.as_secs_f64());
    }
}

fn requests_timer(route: &str, uri: &str, method: &'static str, status: u16) -> metrics::Histogram {
    let name = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(spring_status_name)
        .unwrap_or_else(|| status.to_string());
    // Spring's HttpStatus.Series names.
    let outcome = match status {
        100..=199 => "INFORMATIONAL",
        200..=299 => "SUCCESSFUL",
        300..=399 => "REDIRECTION",
        400..=499 => "CLIENT_ERROR",
        500..=599 => "SERVER_ERROR",
        _ => "CUSTOM",
    };
    metrics::histogram!(
        "spring_cloud_gateway_requests_seconds",
        "routeId" => route.to_owned(),
        "routeUri" => uri.to_owned(),
        "httpMethod" => method,
        "httpStatusCode" => status.to_string(),
        "status" => name,
        "outcome" => outcome,
    )
}

/// Why a route file was refused: the route and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route `{route}`, {field}: {message}")]
pub struct RouteError {
    pub route: String,
    pub field: String,
    pub message: String,
}

/// Every route, compiled and sorted.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    /// Whether a predicate reads the clock (`After`, `Before`, `Between`) or the
    /// request's random draw (`Weight`): each costs something on every request, and
    /// most tables need neither.
    reads_clock: bool,
    draws: bool,
}

impl RouteTable {
    /// Parses a YAML route file: ours (`routes`, `default-filters` at the top), or a
    /// Spring Cloud Gateway `application.yml` whose routes sit under
    /// `spring.cloud.gateway` or `spring.cloud.gateway.server.webflux`, nested or as
    /// dotted keys. In a Spring file every other Spring setting is left alone, but a
    /// gateway setting this gateway does not have is refused by name.
    /// The routes of a file, with the Spring profiles of `SPRING_PROFILES_ACTIVE`.
    pub fn from_yaml(text: &str) -> Result<Self, RouteError> {
        let profiles: Vec<String> = std::env::var("SPRING_PROFILES_ACTIVE")
            .unwrap_or_default()
            .split(',')
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        Self::from_yaml_for(text, &profiles)
    }

    /// The routes of a file for the active `profiles`. A file of several YAML
    /// documents (`---`) is read as Spring reads an `application.yml`: a document
    /// with `spring.config.activate.on-profile` counts only when that profile is
    /// active (besides those given, a profile-less document may name them in
    /// `spring.profiles.active`), and a later document's `routes` or
    /// `default-filters` replace an earlier one's.
    pub fn from_yaml_for(text: &str, profiles: &[String]) -> Result<Self, RouteError> {
        use serde::Deserialize as _;
        let refuse = |field: String, message: String| RouteError {
            route: "-".into(),
            field,
            message,
        };
        let mut documents = Vec::new();
        for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(document).map_err(|e| {
                let field = if index == 0 {
                    "file".to_owned()
                } else {
                    format!("document {}", index + 1)
                };
                refuse(field, e.to_string())
            })?;
            if !value.is_null() {
                documents.push(value);
            }
        }
        let on_profile = |document: &Value| {
            subtree(document, &["spring", "config", "activate", "on-profile"])
                .or_else(|| subtree(document, &["spring", "profiles"]).filter(Value::is_string))
        };
        let mut active: Vec<String> = profiles.to_vec();
        for document in documents.iter().filter(|d| on_profile(d).is_none()) {
            if let Some(Value::String(named)) = subtree(document, &["spring", "profiles", "active"])
            {
                active.extend(named.split(',').map(|p| p.trim().to_owned()));
            }
        }
        let mut prefix = String::new();
        let mut merged = serde_json::Map::new();
        for document in &documents {
            if let Some(condition) = on_profile(document)
                && !profile_matches(&condition, &active)
            {
                continue;
            }
            let (found, section) = spring_section(document).map_err(|(f, m)| refuse(f, m))?;
            if let Value::Object(section) = normalise_keys(section) {
                merged.extend(section);
            }
            if !found.is_empty() {
                prefix = found;
            }
        }
        let file: RouteFile = serde_json::from_value(Value::Object(merged)).map_err(|e| {
            let field = if prefix.is_empty() {
                "file".to_owned()
            } else {
                prefix.clone()
            };
            refuse(field, e.to_string())
        })?;
        Self::compile(&file)
    }

    pub fn compile(file: &RouteFile) -> Result<Self, RouteError> {
        let defaults: Vec<Filter> = file
            .default_filters
            .iter()
            .enumerate()
            .map(|(i, f)| parse_filter("default-filters", i, f))
            .collect::<Result<_, _>>()?;
        let mut seen = std::collections::HashSet::new();
        let mut routes = Vec::new();
        for spec in &file.routes {
            let err = |field: &str, message: String| RouteError {
                route: spec.id.clone(),
                field: field.into(),
                message,
            };
            if spec.id.is_empty() {
                return Err(err("id", "must not be empty".into()));
            }
            if !seen.insert(spec.id.clone()) {
                return Err(err("id", "is used by another route".into()));
            }
            let upstream = parse_uri(&spec.uri).map_err(|m| err("uri", m))?;
            if spec.predicates.is_empty() {
                return Err(err(
                    "predicates",
                    "needs at least one predicate, e.g. Path=/orders/**".into(),
                ));
            }
            let predicates = spec
                .predicates
                .iter()
                .enumerate()
                .map(|(i, p)| parse_predicate(&spec.id, i, p))
                .collect::<Result<Vec<_>, _>>()?;
            let own = spec
                .filters
                .iter()
                .enumerate()
                .map(|(i, f)| parse_filter(&spec.id, i, f))
                .collect::<Result<Vec<_>, _>>()?;
            let filters = interleave(&defaults, own.clone());
            let response_timeout = match spec.metadata.get("response-timeout") {
                None => None,
                Some(value) => Some(std::time::Duration::from_millis(
                    value
                        .as_u64()
                        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
                        .ok_or_else(|| {
                            err("metadata.response-timeout", "must be milliseconds".into())
                        })?,
                )),
            };
            routes.push(Route {
                id: spec.id.clone(),
                uri: spec.uri.clone(),
                upstream,
                predicates,
                plan: crate::plan::Plan::for_route(&filters, &own),
                order: spec.order,
                roles: spec.roles.clone(),
                balancing: spec.balancer,
                response_timeout,
                turn: Default::default(),
                metrics: Default::default(),
                described: RouteDescription {
                    predicates: spec.predicates.iter().map(describe).collect(),
                    filters: file
                        .default_filters
                        .iter()
                        .chain(&spec.filters)
                        .map(describe)
                        .collect(),
                },
            });
        }
        assign_weights(&mut routes)?;
        // Stable: equal orders keep file order.
        routes.sort_by_key(|r| r.order);
        warn_of_unguarded_slashes(&routes);
        let any = |wanted: fn(&Predicate) -> bool| {
            routes
                .iter()
                .any(|route| route.predicates.iter().any(wanted))
        };
        Ok(Self {
            reads_clock: any(|p| {
                matches!(
                    p,
                    Predicate::After(_) | Predicate::Before(_) | Predicate::Between(..)
                )
            }),
            draws: any(|p| matches!(p, Predicate::Weight { .. })),
            routes,
        })
    }

    /// The facts of a request from `peer` that this table's predicates read: the
    /// clock and a random draw only when some predicate reads them.
    pub fn facts_of<'a>(
        &self,
        method: &'a Method,
        uri: &'a Uri,
        headers: &'a HeaderMap,
        peer: Option<std::net::IpAddr>,
    ) -> RequestFacts<'a> {
        RequestFacts {
            method,
            uri,
            headers,
            peer,
            now_ms: if self.reads_clock {
                shared::now_ms()
            } else {
                0
            },
            draw: if self.draws { rand::random() } else { 0 },
        }
    }

    /// The registry services the routes send to.
    pub fn services(&self) -> Vec<String> {
        let mut services: Vec<String> = self
            .routes
            .iter()
            .filter_map(|r| match &r.upstream {
                Upstream::Service(s) => Some(s.clone()),
                Upstream::Fixed(_) => None,
            })
            .collect();
        services.sort();
        services.dedup();
        services
    }

    /// The first route whose predicates all match.
    pub fn find(&self, facts: &RequestFacts<'_>) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| route.predicates.iter().all(|p| p.matches(facts)))
    }
}

/// Warns of a route with roles whose path with a trailing slash goes to a later route:
/// no pattern matches an optional trailing slash (as in Spring Cloud Gateway 5), so
/// with `Path=/admin` guarded and a catch-all after it, `/admin/` would reach the
/// catch-all's upstream without the roles.
fn warn_of_unguarded_slashes(routes: &[Route]) {
    let patterns = |route: &Route| -> Vec<PathPattern> {
        route
            .predicates
            .iter()
            .filter_map(|p| match p {
                Predicate::Path(patterns) => Some(patterns.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    for (at, route) in routes
        .iter()
        .enumerate()
        .filter(|(_, r)| !r.roles.is_empty())
    {
        for pattern in patterns(route) {
            let slashed = format!("{}/", pattern.as_str().trim_end_matches('/'));
            if pattern.matches(&slashed) {
                continue;
            }
            if let Some(other) = routes[at + 1..]
                .iter()
                .find(|later| patterns(later).iter().any(|p| p.matches(&slashed)))
            {
                tracing::warn!(
                    route = %route.id,
                    other = %other.id,
                    "{slashed} goes to route {} without this route's roles: add {}/** to route {}'s Path",
                    other.id,
                    pattern.as_str().trim_end_matches('/'),
                    route.id
                );
            }
        }
    }
}

/// The default filters and a route's own in the order Spring runs them: each list's
/// n-th filter has order n, and equal orders keep defaults first, so the chain is
/// the first default, the route's first, the second default, the route's second...
fn interleave(defaults: &[Filter], own: Vec<Filter>) -> Vec<Filter> {
    let mut merged = Vec::with_capacity(defaults.len() + own.len());
    let mut own = own.into_iter();
    for default in defaults {
        merged.push(default.clone());
        merged.extend(own.next());
    }
    merged.extend(own);
    merged
}

/// Whether a document's `on-profile` (`prod`, `prod,eu`, `!prod`, or a list of these)
/// holds for the `active` profiles: any one entry holding is enough.
fn profile_matches(condition: &Value, active: &[String]) -> bool {
    let entries: Vec<String> = match condition {
        Value::String(text) => text.split(',').map(|e| e.trim().to_owned()).collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|e| e.trim().to_owned())
            .collect(),
        _ => Vec::new(),
    };
    entries.iter().any(|entry| match entry.strip_prefix('!') {
        Some(name) => !active.iter().any(|a| a == name.trim()),
        None => active.iter().any(|a| a == entry),
    })
}

/// The gateway's part of a route file, with the prefix it was found under (empty for
/// our own layout). A document is Spring's when it has a `spring` key, nested or
/// dotted (`spring.cloud.gateway.routes:`).
fn spring_section(document: &Value) -> Result<(String, Value), (String, String)> {
    let Some(top) = document.as_object() else {
        return Err(("file".into(), "must be a map with `routes`".into()));
    };
    let is_spring = top
        .keys()
        .any(|k| k == "spring" || k.starts_with("spring."));
    if !is_spring {
        return Ok((String::new(), document.clone()));
    }
    let gateway = subtree(document, &["spring", "cloud", "gateway"])
        .unwrap_or_else(|| Value::Object(Default::default()));
    // Spring Cloud Gateway 4.3+ moved the settings under `server.webflux`; both load.
    let webflux = subtree(&gateway, &["server", "webflux"]);
    let (prefix, section) = match &webflux {
        Some(webflux) => ("spring.cloud.gateway.server.webflux", webflux.clone()),
        None => ("spring.cloud.gateway", gateway.clone()),
    };
    const SUPPORTED: [&str; 4] = ["routes", "default-filters", "defaultFilters", "enabled"];
    let unsupported = |prefix: &str, section: &Value, also: &dyn Fn(&str) -> bool| {
        let keys = section.as_object().into_iter().flat_map(|m| m.keys());
        for key in keys {
            if !SUPPORTED.contains(&key.as_str()) && !also(key) {
                return Err((
                    format!("{prefix}.{key}"),
                    "is a Spring Cloud Gateway setting this gateway does not support".to_owned(),
                ));
            }
        }
        Ok(())
    };
    let servers = subtree(&gateway, &["server"]);
    let other_server = servers
        .as_ref()
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|m| m.keys())
        .map(|k| k.split('.').next().unwrap_or_default())
        .find(|k| *k != "webflux");
    if let Some(other) = other_server {
        return Err((
            format!("spring.cloud.gateway.server.{other}"),
            "is not supported: this gateway is Spring Cloud Gateway Server WebFlux".into(),
        ));
    }
    let is_server = |key: &str| key == "server" || key.starts_with("server.");
    if webflux.is_some() {
        // Beside `server.webflux`, only what both layouts share may stay at the top.
        unsupported("spring.cloud.gateway", &gateway, &|k| is_server(k))?;
    }
    unsupported(prefix, &section, &|_| false)?;
    let mut section = section;
    if let Some(map) = section.as_object_mut() {
        map.remove("enabled");
    }
    Ok((prefix.into(), section))
}

/// What lies under `path` in `value`, whether the path is written as nested maps, as
/// dotted keys (`spring.cloud.gateway: ...`, `spring.cloud.gateway.routes: ...`) or a
/// mix; several spellings of one path are merged. Keys below the path are kept as
/// written, so dotted argument names (`redis-rate-limiter.replenishRate`) survive.
fn subtree(value: &Value, path: &[&str]) -> Option<Value> {
    if path.is_empty() {
        return Some(value.clone());
    }
    let map = value.as_object()?;
    let mut found: Option<serde_json::Map<String, Value>> = None;
    for (key, inner) in map {
        let parts: Vec<&str> = key.split('.').collect();
        let common = parts.iter().zip(path).take_while(|(a, b)| a == b).count();
        if common == parts.len() {
            // The key is (a part of) the path: look further inside.
            match subtree(inner, &path[common..]) {
                Some(Value::Object(more)) => {
                    merge(found.get_or_insert_with(Default::default), more)
                }
                Some(other) => return Some(other),
                None => {}
            }
        } else if common == path.len() {
            // The path ends inside the key: the rest of the key lives in the section.
            let mut entry = serde_json::Map::new();
            entry.insert(parts[common..].join("."), inner.clone());
            merge(found.get_or_insert_with(Default::default), entry);
        }
    }
    found.map(Value::Object)
}

fn merge(into: &mut serde_json::Map<String, Value>, from: serde_json::Map<String, Value>) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(Value::Object(existing)), Value::Object(more)) => merge(existing, more),
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// Spring's relaxed binding: `defaultFilters` is `default-filters`.
fn normalise_keys(mut section: Value) -> Value {
    if let Some(map) = section.as_object_mut()
        && let Some(filters) = map.remove("defaultFilters")
    {
        map.insert("default-filters".into(), filters);
    }
    section
}

/// `lb://service`, `http://` or `https://host:port`; and Spring's WebSocket forms,
/// `lb:ws://service`, `lb:wss://service`, `ws://` and `wss://host:port`, which name the
/// same upstreams (an upgrade is passed through on any route, as it is in Spring).
fn parse_uri(uri: &str) -> Result<Upstream, String> {
    const EXPECTED: &str =
        "must be lb://service, http://host:port or https://host:port (or ws://, wss://, lb:ws://)";
    let balanced = uri
        .strip_prefix("lb://")
        .or_else(|| uri.strip_prefix("lb:ws://"))
        .or_else(|| uri.strip_prefix("lb:wss://"));
    if let Some(service) = balanced {
        if service.is_empty() || service.contains('/') {
            return Err("lb:// needs a service name, e.g. lb://order-service".into());
        }
        return Ok(Upstream::Service(service.to_ascii_lowercase()));
    }
    let parsed: Uri = uri.parse().map_err(|_| EXPECTED.to_owned())?;
    let scheme = match parsed.scheme_str() {
        Some("http" | "ws") => "http",
        Some("https" | "wss") => "https",
        _ => return Err(EXPECTED.into()),
    };
    match parsed.authority() {
        Some(authority) => Ok(Upstream::Fixed(format!("{scheme}://{authority}"))),
        None => Err(EXPECTED.into()),
    }
}

/// Whether `args` came from the shortcut spelling (`Name=a, b`): only positional keys.
pub(crate) fn shortcut_form(args: &BTreeMap<String, String>) -> bool {
    args.keys().all(|k| k.starts_with("_genkey_"))
}

/// An argument by its name in the expanded form, by its place in the shortcut form
/// (Spring's `shortcutFieldOrder`).
fn named_or_at<'a>(
    args: &'a BTreeMap<String, String>,
    vals: &'a [String],
    name: &str,
    place: usize,
) -> Option<&'a String> {
    if shortcut_form(args) {
        vals.get(place)
    } else {
        args.get(name)
    }
}

/// A predicate or filter as `(name, args)`, from either of Spring's spellings. Shortcut
/// arguments are split on commas into `_genkey_0`, `_genkey_1`... as Spring does.
fn name_and_args(value: &Value) -> Result<(String, BTreeMap<String, String>), String> {
    match value {
        Value::String(shortcut) => {
            let (name, args) = shortcut.split_once('=').unwrap_or((shortcut, ""));
            // Spring tokenizes the arguments trimmed, dropping empty ones: `a, , b` is
            // two arguments, `b` the second. Said, since it moves what follows.
            let tokens: Vec<&str> = args.split(',').map(str::trim).collect();
            let moved = tokens
                .iter()
                .position(|t| t.is_empty())
                .is_some_and(|gap| tokens[gap..].iter().any(|t| !t.is_empty()));
            if moved {
                tracing::warn!(
                    shortcut = %shortcut,
                    "an empty argument is dropped, as Spring Cloud Gateway drops it: the \
                     arguments after it move up one place"
                );
            }
            let args = tokens
                .into_iter()
                .filter(|a| !a.is_empty())
                .enumerate()
                .map(|(i, a)| (format!("_genkey_{i}"), a.to_owned()))
                .collect();
            Ok((name.trim().to_owned(), args))
        }
        Value::Object(map) => {
            let name = map
                .get("name")
                .and_then(Value::as_str)
                .ok_or("needs a `name`")?
                .to_owned();
            let args = match map.get("args") {
                None => BTreeMap::new(),
                Some(Value::Object(args)) => {
                    let mut flat = BTreeMap::new();
                    flatten_args("", args, &mut flat);
                    flat
                }
                Some(_) => return Err("`args` must be a map".into()),
            };
            Ok((name, args))
        }
        _ => Err("must be `Name=args` or {name, args}".into()),
    }
}

/// Arguments as Spring binds them: a nested map (`backoff: {factor: 2}`) by dotted
/// keys (`backoff.factor`), a list as its items joined by commas.
fn flatten_args(
    prefix: &str,
    args: &serde_json::Map<String, Value>,
    into: &mut BTreeMap<String, String>,
) {
    for (key, value) in args {
        let key = format!("{prefix}{key}");
        match value {
            Value::Object(nested) => flatten_args(&format!("{key}."), nested, into),
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(scalar_text).collect();
                into.insert(key, items.join(","));
            }
            other => {
                into.insert(key, scalar_text(other));
            }
        }
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The positional values of shortcut args, or the named ones in order.
fn values(args: &BTreeMap<String, String>) -> Vec<String> {
    let mut positional: Vec<(usize, &String)> = args
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("_genkey_")?.parse().ok().map(|i| (i, v)))
        .collect();
    if positional.is_empty() {
        return args.values().cloned().collect();
    }
    positional.sort();
    positional.into_iter().map(|(_, v)| v.clone()).collect()
}

fn parse_predicate(route: &str, index: usize, value: &Value) -> Result<Predicate, RouteError> {
    let field = format!("predicates[{index}]");
    let err = |message: String| RouteError {
        route: route.into(),
        field: field.clone(),
        message,
    };
    let (name, args) = name_and_args(value).map_err(err)?;
    let vals = values(&args);
    let first = |what: &str| {
        vals.first()
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| err(format!("{name} needs {what}")))
    };
    let regex = |pattern: Option<&String>| -> Result<Option<regex::Regex>, RouteError> {
        pattern
            .filter(|p| !p.is_empty())
            .map(|p| {
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| err(format!("invalid regex {p}: {e}")))
            })
            .transpose()
    };
    // A list argument as Spring binds it: shortcut values, or the named list (`patterns:
    // [/a, /b]`, `patterns.0: /a`, `patterns: /a,/b`), beside the named flags given.
    let list = |list_name: &str, flags: &[&str]| -> Result<Vec<String>, RouteError> {
        if shortcut_form(&args) {
            let mut items = vals.clone();
            // Spring's `Path=/a,/b,false`: a trailing flag, not a pattern.
            if !flags.is_empty() && items.last().is_some_and(|v| v == "true" || v == "false") {
                items.pop();
            }
            return Ok(items);
        }
        let mut items = Vec::new();
        for (key, value) in &args {
            let base = key.split('.').next().unwrap_or_default();
            if base == list_name {
                items.extend(value.split(',').map(|v| v.trim().to_owned()));
            } else if !flags.contains(&key.as_str()) {
                return Err(err(format!(
                    "{name} has no argument {key}; use {list_name}{}",
                    flags.iter().map(|f| format!(", {f}")).collect::<String>()
                )));
            }
        }
        Ok(items)
    };
    match name.as_str() {
        "Path" => {
            // `matchTrailingSlash` is read and, as in Spring Cloud Gateway 5, has no
            // effect: no pattern matches an optional trailing slash.
            let patterns = list("patterns", &["matchTrailingSlash"])?;
            if patterns.iter().all(|p| p.is_empty()) {
                return Err(err("Path needs a pattern such as /orders/**".into()));
            }
            let patterns = patterns
                .iter()
                .map(|p| PathPattern::parse(p).map_err(err))
                .collect::<Result<_, _>>()?;
            Ok(Predicate::Path(patterns))
        }
        "Method" => {
            let vals = list("methods", &[])?;
            if vals.iter().all(|m| m.is_empty()) {
                return Err(err("Method needs a method such as GET".into()));
            }
            let methods = vals
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| err(format!("{m} is not an HTTP method")))
                })
                .collect::<Result<_, _>>()?;
            Ok(Predicate::Method(methods))
        }
        "Header" => {
            let header = HeaderName::from_bytes(first("a header name")?.as_bytes())
                .map_err(|_| err("invalid header name".into()))?;
            Ok(Predicate::Header(header, regex(vals.get(1))?))
        }
        "Host" => {
            let patterns = list("patterns", &[])?;
            if patterns.iter().all(|p| p.is_empty()) {
                return Err(err(
                    "Host needs a host pattern such as **.example.org".into()
                ));
            }
            // A variable is a whole label, without a regex: Spring's `{name:regex}` and
            // `{a}-api` would match other hosts here than there.
            if let Some(label) = patterns.iter().flat_map(|p| p.split('.')).find(|label| {
                (label.contains('{') || label.contains('}'))
                    && !(label.starts_with('{')
                        && label.ends_with('}')
                        && label[1..label.len() - 1]
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            }) {
                return Err(err(format!(
                    "Host label {label}: a variable is a whole label named by letters, \
                     digits and _, such as {{tenant}}; a regex or text beside it is not \
                     supported"
                )));
            }
            // As written: labels compare case-insensitively when matched.
            Ok(Predicate::Host(patterns))
        }
        "Query" => Ok(Predicate::Query(
            first("a parameter name")?,
            regex(vals.get(1))?,
        )),
        "After" => Ok(Predicate::After(
            parse_instant(&first("an instant")?).map_err(err)?,
        )),
        "Before" => Ok(Predicate::Before(
            parse_instant(&first("an instant")?).map_err(err)?,
        )),
        "Between" => {
            let from = parse_instant(&first("two instants")?).map_err(err)?;
            let to = vals
                .get(1)
                .ok_or_else(|| err("Between needs two instants".into()))
                .and_then(|t| parse_instant(t).map_err(err))?;
            if to <= from {
                return Err(err("Between needs the earlier instant first".into()));
            }
            Ok(Predicate::Between(from, to))
        }
        "Cookie" => {
            let name = first("a cookie name")?;
            let pattern = vals
                .get(1)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| err("Cookie needs a name and a regex for its value".into()))?;
            Ok(Predicate::Cookie(
                name,
                regex(Some(pattern))?.expect("a pattern"),
            ))
        }
        "RemoteAddr" | "XForwardedRemoteAddr" => {
            let vals = list("sources", &["maxTrustedIndex"])?;
            // Spring's default, the nearest proxy's entry, is the only one we read.
            if let Some(index) = args.get("maxTrustedIndex")
                && index.trim() != "1"
            {
                return Err(err(format!(
                    "maxTrustedIndex {index}: only 1 (the last X-Forwarded-For entry) is supported"
                )));
            }
            if vals.iter().all(|v| v.is_empty()) {
                return Err(err(format!(
                    "{name} needs a network such as 192.168.1.0/24"
                )));
            }
            let networks = vals
                .iter()
                .filter(|v| !v.is_empty())
                .map(|n| shared::networks::parse_network(n).map_err(err))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(if name == "RemoteAddr" {
                Predicate::RemoteAddr(networks)
            } else {
                Predicate::XForwardedRemoteAddr(networks)
            })
        }
        "Weight" => {
            let group = first("a group and a weight")?;
            let weight = vals
                .get(1)
                .and_then(|w| w.trim().parse::<u32>().ok())
                .ok_or_else(|| err("Weight needs a group and a whole number weight".into()))?;
            Ok(Predicate::Weight {
                group,
                from: 0.0,
                to: f64::from(weight),
            })
        }
        other => Err(err(format!(
            "unknown predicate {other}; use Path, Method, Header, Host, Query, After, Before, \
             Between, Cookie, RemoteAddr, XForwardedRemoteAddr or Weight"
        ))),
    }
}

fn parse_filter(route: &str, index: usize, value: &Value) -> Result<Filter, RouteError> {
    let field = if route == "default-filters" {
        format!("default-filters[{index}]")
    } else {
        format!("filters[{index}]")
    };
    let route = if route == "default-filters" {
        "-"
    } else {
        route
    };
    let err = |message: String| RouteError {
        route: route.into(),
        field: field.clone(),
        message,
    };
    let (name, args) = name_and_args(value).map_err(err)?;
    let vals = values(&args);
    let header_pair = |vals: &[String]| -> Result<(HeaderName, HeaderValue), RouteError> {
        let (Some(name), Some(value)) = (vals.first(), vals.get(1)) else {
            return Err(err("needs a header name and a value".into()));
        };
        Ok((
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| err("invalid header name".into()))?,
            HeaderValue::from_str(value).map_err(|_| err("invalid header value".into()))?,
        ))
    };
    let first_val = |what: &str| {
        vals.first()
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| err(format!("{name} needs {what}")))
    };
    let arg = |key: &str, place: usize| named_or_at(&args, &vals, key, place).cloned();
    // A boolean as Spring converts one; none (or empty) is `default`.
    let flag =
        |key: &str, place: usize, default: bool| match arg(key, place).as_deref().map(str::trim) {
            None | Some("") => Ok(default),
            Some(v)
                if ["true", "on", "yes", "1"]
                    .iter()
                    .any(|t| v.eq_ignore_ascii_case(t)) =>
            {
                Ok(true)
            }
            Some(v)
                if ["false", "off", "no", "0"]
                    .iter()
                    .any(|f| v.eq_ignore_ascii_case(f)) =>
            {
                Ok(false)
            }
            Some(other) => Err(err(format!("{key} must be true or false, not {other}"))),
        };
    let header_name = |raw: Option<&str>| {
        raw.and_then(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .ok_or_else(|| err("needs a valid header name".into()))
    };
    match name.as_str() {
        "StripPrefix" => {
            let parts = vals
                .first()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| err("StripPrefix needs a number of path segments".into()))?;
            Ok(Filter::Path(PathEdit::Strip(parts)))
        }
        "RewritePath" => {
            let (Some(pattern), Some(replacement)) = (vals.first(), vals.get(1)) else {
                return Err(err("RewritePath needs a regex and a replacement".into()));
            };
            let regex =
                regex::Regex::new(pattern).map_err(|e| err(format!("invalid regex: {e}")))?;
            // Spring writes named groups as ${name}; so does the regex crate.
            Ok(Filter::Path(PathEdit::Rewrite(
                regex,
                replacement.replace("$\\", "$"),
            )))
        }
        "AddRequestHeader" => {
            let (n, v) = header_pair(&vals)?;
            Ok(Filter::RequestHeader(HeaderEdit::Add(n, v)))
        }
        "AddResponseHeader" => {
            let (Some(name), Some(value)) = (
                arg("name", 0).filter(|n| !n.is_empty()),
                arg("value", 1).filter(|v| !v.is_empty()),
            ) else {
                return Err(err("needs a header name and a value".into()));
            };
            let (n, v) = header_pair(&[name, value])?;
            Ok(Filter::Response(match flag("override", 2, true)? {
                true => ResponseEdit::Add(n, v),
                false => ResponseEdit::AddIfBlank(n, v),
            }))
        }
        "RemoveRequestHeader" => {
            let name = vals
                .first()
                .ok_or_else(|| err("needs a header name".into()))?;
            Ok(Filter::RequestHeader(HeaderEdit::Remove(
                HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| err("invalid header name".into()))?,
            )))
        }
        "RequestSize" => {
            let raw = args
                .get("maxSize")
                .cloned()
                .or_else(|| vals.first().cloned())
                .ok_or_else(|| err("RequestSize needs maxSize, e.g. 1MB".into()))?;
            Ok(Filter::RequestSize(parse_size(&raw).map_err(err)?))
        }
        "SecureHeaders" => Ok(Filter::Response(ResponseEdit::SecureHeaders)),
        "SetRequestHeader" => {
            let (n, v) = header_pair(&vals)?;
            Ok(Filter::RequestHeader(HeaderEdit::Set(n, v)))
        }
        "SetResponseHeader" => {
            let (n, v) = header_pair(&vals)?;
            Ok(Filter::Response(ResponseEdit::Set(n, v)))
        }
        "RemoveResponseHeader" => Ok(Filter::Response(ResponseEdit::Remove(header_name(
            vals.first().map(String::as_str),
        )?))),
        "AddRequestHeadersIfNotPresent" => {
            // Spring's shortcut: `Name-1:value,Name-2:value`.
            first_val("name:value pairs")?;
            let pairs = vals
                .iter()
                .map(|pair| {
                    let (name, value) = pair
                        .split_once(':')
                        .ok_or_else(|| err(format!("{pair} is not name:value")))?;
                    header_pair(&[name.trim().to_owned(), value.trim().to_owned()])
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Filter::RequestHeader(HeaderEdit::AddIfAbsent(pairs)))
        }
        "MapRequestHeader" => {
            let from = args.get("fromHeader").or(vals.first()).map(String::as_str);
            let to = args.get("toHeader").or(vals.get(1)).map(String::as_str);
            Ok(Filter::RequestHeader(HeaderEdit::Map(
                header_name(from)?,
                header_name(to)?,
            )))
        }
        "SetRequestHostHeader" => {
            let host = args
                .get("host")
                .or(vals.first())
                .map(String::as_str)
                .unwrap_or_default();
            let value = HeaderValue::from_str(host)
                .ok()
                .filter(|_| !host.is_empty())
                .ok_or_else(|| err("SetRequestHostHeader needs a host".into()))?;
            Ok(Filter::RequestHeader(HeaderEdit::SetHost(value)))
        }
        "PreserveHostHeader" => Ok(Filter::RequestHeader(HeaderEdit::PreserveHost)),
        "PrefixPath" => {
            let prefix = first_val("a prefix such as /api")?;
            if !prefix.starts_with('/') {
                return Err(err("PrefixPath must start with /".into()));
            }
            Ok(Filter::Path(PathEdit::Prefix(
                prefix.trim_end_matches('/').to_owned(),
            )))
        }
        "SetPath" => {
            let template = args
                .get("template")
                .cloned()
                .map_or_else(|| first_val("a template such as /{segment}"), Ok)?;
            if !template.starts_with('/') {
                return Err(err("SetPath's template must start with /".into()));
            }
            Ok(Filter::Path(PathEdit::Set(template)))
        }
        "AddRequestParameter" => {
            let (Some(name), Some(value)) = (vals.first(), vals.get(1)) else {
                return Err(err("AddRequestParameter needs a name and a value".into()));
            };
            Ok(Filter::Query(QueryEdit::Add(name.clone(), value.clone())))
        }
        "RemoveRequestParameter" => Ok(Filter::Query(QueryEdit::Remove(first_val(
            "a parameter name",
        )?))),
        "DedupeResponseHeader" => {
            let names = first_val("header names separated by spaces")?;
            let names = names
                .split_whitespace()
                .map(|n| header_name(Some(n)))
                .collect::<Result<Vec<_>, _>>()?;
            let strategy = match vals.get(1).map(|s| s.trim()) {
                None | Some("" | "RETAIN_FIRST") => Dedupe::RetainFirst,
                Some("RETAIN_LAST") => Dedupe::RetainLast,
                Some("RETAIN_UNIQUE") => Dedupe::RetainUnique,
                Some(other) => {
                    return Err(err(format!(
                        "strategy {other}: use RETAIN_FIRST, RETAIN_LAST or RETAIN_UNIQUE"
                    )));
                }
            };
            Ok(Filter::Response(ResponseEdit::Dedupe(names, strategy)))
        }
        "RewriteResponseHeader" => {
            let (Some(name), Some(pattern), Some(replacement)) =
                (vals.first(), vals.get(1), vals.get(2))
            else {
                return Err(err(
                    "RewriteResponseHeader needs a header, a regex and a replacement".into(),
                ));
            };
            let regex =
                regex::Regex::new(pattern).map_err(|e| err(format!("invalid regex: {e}")))?;
            Ok(Filter::Response(ResponseEdit::Rewrite(
                header_name(Some(name))?,
                regex,
                replacement.replace("$\\", "$"),
            )))
        }
        "SetStatus" => Ok(Filter::Response(ResponseEdit::SetStatus(
            status_arg(&first_val("a status such as 401 or UNAUTHORIZED")?).map_err(err)?,
        ))),
        "RedirectTo" => {
            let status = arg("status", 0)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| err("RedirectTo needs a 3xx status and a URL".into()))?;
            let status = status_arg(&status).map_err(err)?;
            if !status.is_redirection() {
                return Err(err(format!(
                    "RedirectTo needs a 3xx status, not {}",
                    status.as_u16()
                )));
            }
            let url = arg("url", 1)
                .and_then(|u| HeaderValue::from_str(&u).ok())
                .ok_or_else(|| err("RedirectTo needs a URL".into()))?;
            Ok(Filter::RedirectTo(crate::plan::Redirect {
                status,
                url,
                include_request_params: flag("includeRequestParams", 2, false)?,
            }))
        }
        "RequestHeaderSize" => {
            let raw = args
                .get("maxSize")
                .cloned()
                .map_or_else(|| first_val("maxSize, e.g. 1000B"), Ok)?;
            let size = parse_size(&raw).map_err(err)?;
            Ok(Filter::RequestHeaderSize(
                usize::try_from(size).unwrap_or(usize::MAX),
            ))
        }
        "RewriteLocationResponseHeader" => Ok(Filter::Response(ResponseEdit::RewriteLocation(
            Box::new(RewriteLocation::from_args(&args, &vals).map_err(err)?),
        ))),
        "Retry" => Ok(Filter::Retry(
            crate::plan::RetryPolicy::from_args(&args, &vals).map_err(err)?,
        )),
        "CircuitBreaker" => Ok(Filter::CircuitBreaker(std::sync::Arc::new(
            crate::breaker::CircuitBreaker::from_args(&args).map_err(err)?,
        ))),
        "RequestRateLimiter" => Ok(Filter::RequestRateLimiter(std::sync::Arc::new(
            crate::limits::RateLimiter::from_args(&args).map_err(err)?,
        ))),
        other => Err(err(format!("unknown filter {other}"))),
    }
}

/// Spring's `HttpStatus` name of a status: `OK`, `NOT_FOUND`, `SERVICE_UNAVAILABLE`.
fn spring_status_name(code: axum::http::StatusCode) -> Option<String> {
    code.canonical_reason()
        .map(|r| r.to_ascii_uppercase().replace([' ', '-'], "_"))
}

/// A status as a number (`401`) or Spring's `HttpStatus` name (`UNAUTHORIZED`).
pub(crate) fn status_arg(raw: &str) -> Result<axum::http::StatusCode, String> {
    let raw = raw.trim();
    if let Ok(code) = raw.parse::<u16>() {
        return axum::http::StatusCode::from_u16(code)
            .map_err(|_| format!("{raw} is not a status"));
    }
    // Spring's names that are not the reason phrase in capitals.
    const ALIASES: [(&str, u16); 5] = [
        ("I_AM_A_TEAPOT", 418),
        ("CONTENT_TOO_LARGE", 413),
        ("UNPROCESSABLE_CONTENT", 422),
        ("REQUESTED_RANGE_NOT_SATISFIABLE", 416),
        ("MOVED_TEMPORARILY", 302),
    ];
    if let Some((_, code)) = ALIASES.iter().find(|(name, _)| *name == raw) {
        return axum::http::StatusCode::from_u16(*code).map_err(|_| raw.to_owned());
    }
    (100..600)
        .filter_map(|c| axum::http::StatusCode::from_u16(c).ok())
        .find(|c| spring_status_name(*c).is_some_and(|name| name == raw))
        .ok_or_else(|| format!("{raw} is not a status such as 401 or UNAUTHORIZED"))
}

/// `5000`, `512KB`, `1MB` (Spring's DataSize units, powers of 1024).
fn parse_size(raw: &str) -> Result<u64, String> {
    let raw = raw.trim().to_ascii_uppercase();
    let (number, multiplier) = if let Some(n) = raw.strip_suffix("KB") {
        (n, 1024)
    } else if let Some(n) = raw.strip_suffix("MB") {
        (n, 1024 * 1024)
    } else if let Some(n) = raw.strip_suffix('B') {
        (n, 1)
    } else {
        (raw.as_str(), 1)
    };
    number
        .trim()
        .parse::<u64>()
        .map(|n| n * multiplier)
        .map_err(|_| format!("{raw} is not a size such as 1MB"))
}

impl Predicate {
    pub fn matches(&self, facts: &RequestFacts<'_>) -> bool {
        let (method, uri, headers) = (facts.method, facts.uri, facts.headers);
        match self {
            Predicate::Path(patterns) => patterns.iter().any(|p| p.matches(uri.path())),
            Predicate::Method(methods) => methods.contains(method),
            // Spring reads a header as a list: each comma-separated value on its own,
            // and an empty header as no value at all.
            Predicate::Header(name, regex) => headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .any(|v| regex.as_ref().is_none_or(|r| r.is_match(v))),
            // The whole `Host`, port included, as Spring matches it (a pattern without
            // a port does not match a host with one); names compare case-insensitively.
            Predicate::Host(patterns) => {
                let host = request_host(headers, uri);
                patterns.iter().any(|p| host_captures(p, host).is_some())
            }
            // Names and values compared decoded, as the upstream reads them.
            Predicate::Query(name, regex) => {
                form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                    .filter(|(k, _)| k == name)
                    .any(|(_, v)| regex.as_ref().is_none_or(|r| r.is_match(&v)))
            }
            Predicate::After(at) => facts.now_ms > *at,
            Predicate::Before(at) => facts.now_ms < *at,
            Predicate::Between(from, to) => facts.now_ms > *from && facts.now_ms < *to,
            Predicate::Cookie(name, regex) => headers
                .get_all(axum::http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .any(|(k, v)| k == name && regex.is_match(v)),
            Predicate::RemoteAddr(networks) => facts
                .peer
                .is_some_and(|ip| shared::networks::any_contains(networks, ip)),
            Predicate::XForwardedRemoteAddr(networks) => {
                // Only the last entry counts: an unreadable one matches nothing rather
                // than letting an earlier, client-written entry stand in for it. Several
                // `X-Forwarded-For` lines are not believed at all, as Spring does not
                // believe them: the peer decides.
                let lines = headers.get_all("x-forwarded-for").iter().count();
                let ip = match shared::networks::last_forwarded_for(headers) {
                    Some(entry) if lines == 1 => entry.parse::<std::net::IpAddr>().ok(),
                    _ => facts.peer,
                };
                ip.is_some_and(|ip| shared::networks::any_contains(networks, ip))
            }
            Predicate::Weight { group, from, to } => {
                let x = group_draw(facts.draw, group);
                *from <= x && x < *to
            }
        }
    }
}

/// The request's draw for `group`, in `[0, 1)`: groups draw independently.
fn group_draw(draw: u64, group: &str) -> f64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    draw.hash(&mut hasher);
    group.hash(&mut hasher);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Turns each `Weight` predicate's raw weight (kept in `to` until now) into its share
/// of the group: routes of a group take consecutive ranges of `[0, 1)` in file order.
fn assign_weights(routes: &mut [Route]) -> Result<(), RouteError> {
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for route in routes.iter() {
        for p in &route.predicates {
            if let Predicate::Weight { group, to, .. } = p {
                *totals.entry(group.clone()).or_default() += *to;
            }
        }
    }
    let mut taken: BTreeMap<String, f64> = BTreeMap::new();
    for route in routes.iter_mut() {
        for p in &mut route.predicates {
            if let Predicate::Weight { group, from, to } = p {
                let total = totals.get(group.as_str()).copied().unwrap_or(0.0);
                if total <= 0.0 {
                    return Err(RouteError {
                        route: route.id.clone(),
                        field: "predicates".into(),
                        message: format!("weight group {group} has no positive weight"),
                    });
                }
                let start = taken.entry(group.clone()).or_default();
                *from = *start / total;
                *start += *to;
                *to = *start / total;
            }
        }
    }
    Ok(())
}

/// An instant as Spring writes it (`2026-01-20T17:42:47.789-07:00[America/Denver]`,
/// the zone name in brackets being informative only), or epoch milliseconds.
fn parse_instant(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let offset_part = text.split('[').next().unwrap_or(text);
    chrono::DateTime::parse_from_rfc3339(offset_part)
        .ok()
        .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
        .ok_or_else(|| {
            format!(
                "{text} is not an instant such as 2026-01-20T17:42:47.789-07:00[America/Denver]"
            )
        })
}

/// `*` matches one label, `**` any number (at least one) of leading labels.
/// The `Host` a request asked for, port included: its header, or the authority of an
/// absolute-form target.
pub fn request_host<'r>(headers: &'r HeaderMap, uri: &'r Uri) -> &'r str {
    headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
}

/// The `{variables}` a `Host` pattern captures from `host`, when
/// it matches: labels compare case-insensitively, `*` is any one label, `{name}` any
/// one label of letters, digits, `-` and `_`, captured under its name (as the client
/// wrote it), and a leading `**.`
/// any number of labels, none included (`**.example.org` is `example.org` too).
fn host_captures<'p>(pattern: &'p str, host: &str) -> Option<Vec<(&'p str, String)>> {
    let (any_leading, rest) = match pattern.strip_prefix("**.") {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let wanted = rest.split('.').count();
    let labels = host.split('.').count();
    if labels < wanted || (!any_leading && labels != wanted) {
        return None;
    }
    let mut captures = Vec::new();
    for (p, h) in rest.split('.').zip(host.split('.').skip(labels - wanted)) {
        if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            // A name's label only: the value may be put into a path or a header, where
            // a `/`, `?` or `%` from a crafted `Host` would change its shape.
            let label = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
            if h.is_empty() || !h.bytes().all(label) {
                return None;
            }
            captures.push((name, h.to_owned()));
        } else if p != "*" && !p.eq_ignore_ascii_case(h) {
            return None;
        }
    }
    Some(captures)
}

/// A path's segments. A trailing slash is one more, empty segment: Spring's patterns
/// no longer match an optional trailing slash, so `/orders/` is not `/orders` (but is
/// `/orders/**`).
/// Read as they are compared, without collecting them: route matching runs on every
/// request.
fn path_segments(path: &str) -> impl Iterator<Item = &str> {
    let trailing = path.ends_with('/') && path.bytes().any(|b| b != b'/');
    path.split('/')
        .filter(|s| !s.is_empty())
        .chain(trailing.then_some(""))
}

/// A Spring path pattern: literal segments, `*` for one segment, `**` for any number
/// of segments (including none), `{name}` for one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    /// One segment, captured under its name for `SetPath`.
    Var(String),
    Any,
}

impl PathPattern {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if !raw.starts_with('/') {
            return Err(format!("path pattern {raw} must start with /"));
        }
        let segments: Vec<Segment> = raw
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| match s {
                "**" => Segment::Any,
                "*" => Segment::One,
                s if s.starts_with('{') && s.ends_with('}') => {
                    Segment::Var(s[1..s.len() - 1].to_owned())
                }
                s => Segment::Literal(s.to_owned()),
            })
            .collect();
        if segments[..segments.len().saturating_sub(1)].contains(&Segment::Any) {
            return Err(format!("{raw}: ** is only supported at the end"));
        }
        Ok(Self {
            raw: raw.to_owned(),
            segments,
        })
    }

    pub fn matches(&self, path: &str) -> bool {
        let mut parts = path_segments(path);
        for segment in &self.segments {
            match segment {
                Segment::Any => return true,
                Segment::One | Segment::Var(_) => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                // Compared decoded, as Spring compares: `/p%61th` is `/path`.
                Segment::Literal(l) => {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    let same = if part.contains('%') {
                        percent_encoding::percent_decode_str(part).decode_utf8_lossy() == *l
                    } else {
                        part == l.as_str()
                    };
                    if !same {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// The `{variables}` of `path`, when the pattern matches it.
    pub fn captures(&self, path: &str) -> Option<Vec<(&str, String)>> {
        if !self.matches(path) {
            return None;
        }
        let parts = path_segments(path);
        Some(
            self.segments
                .iter()
                .zip(parts)
                .filter_map(|(segment, part)| match segment {
                    Segment::Var(name) => Some((name.as_str(), part.to_owned())),
                    _ => None,
                })
                .collect(),
        )
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

impl Route {
    /// The `{variables}` the route's `Path` and `Host` predicates capture from the
    /// request's path and `host`, merged in the predicates' order (a later one's value
    /// wins a name both capture), as Spring merges its URI template variables.
    pub fn template_variables<'a>(&'a self, path: &str, host: &str) -> Vec<(&'a str, String)> {
        let mut variables: Vec<(&'a str, String)> = Vec::new();
        for predicate in &self.predicates {
            let captured = match predicate {
                Predicate::Path(patterns) => {
                    patterns.iter().find_map(|pattern| pattern.captures(path))
                }
                Predicate::Host(patterns) => patterns
                    .iter()
                    .find_map(|pattern| host_captures(pattern, host)),
                _ => None,
            };
            for (name, value) in captured.unwrap_or_default() {
                variables.retain(|(known, _)| *known != name);
                variables.push((name, value));
            }
        }
        variables
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_uris_name_the_same_upstreams_as_springs() {
        assert_eq!(
            parse_uri("lb:ws://Chat"),
            Ok(Upstream::Service("chat".into()))
        );
        assert_eq!(
            parse_uri("lb:wss://chat"),
            Ok(Upstream::Service("chat".into()))
        );
        assert_eq!(
            parse_uri("ws://127.0.0.1:9000"),
            Ok(Upstream::Fixed("http://127.0.0.1:9000".into()))
        );
        assert_eq!(
            parse_uri("wss://chat.internal:443"),
            Ok(Upstream::Fixed("https://chat.internal:443".into()))
        );
        assert!(parse_uri("ftp://files:21").unwrap_err().contains("ws://"));
    }

    fn table(yaml: &str) -> RouteTable {
        RouteTable::from_yaml(yaml).unwrap()
    }

    fn find<'a>(
        t: &'a RouteTable,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Option<&'a str> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let uri: Uri = uri.parse().unwrap();
        let facts = t.facts_of(&method, &uri, &map, Some([10, 0, 0, 7].into()));
        t.find(&facts).map(|r| r.id.as_str())
    }

    #[test]
    fn double_star_matches_the_prefix_itself_and_anything_below() {
        let p = PathPattern::parse("/orders/**").unwrap();
        for yes in ["/orders", "/orders/", "/orders/1", "/orders/1/items"] {
            assert!(p.matches(yes), "{yes}");
        }
        for no in ["/order", "/ordersx", "/payments/orders"] {
            assert!(!p.matches(no), "{no}");
        }
        let one = PathPattern::parse("/orders/{id}").unwrap();
        assert!(one.matches("/orders/7") && !one.matches("/orders") && !one.matches("/orders/7/x"));
    }

    #[test]
    fn a_trailing_slash_is_one_more_empty_segment() {
        let exact = PathPattern::parse("/orders").unwrap();
        assert!(exact.matches("/orders") && !exact.matches("/orders/"));
        let one = PathPattern::parse("/orders/{id}").unwrap();
        assert!(!one.matches("/orders/") && one.matches("/orders/7") && !one.matches("/orders/7/"));
        let root = PathPattern::parse("/").unwrap();
        assert!(root.matches("/") && !root.matches("/orders"));
        assert_eq!(
            one.captures("/orders/7"),
            Some(vec![("id", "7".to_owned())])
        );
    }

    #[test]
    fn every_predicate_in_both_spellings() {
        let t = table(
            r#"
routes:
  - id: admin-stats
    uri: lb://order-service
    order: -1
    predicates:
      - Path=/orders/stats
      - Method=GET
      - name: Header
        args: { header: X-Tenant, regexp: "acme|globex" }
  - id: host
    uri: http://127.0.0.1:9000
    predicates: [ "Host=**.shop.test", "Query=debug,tr.e" ]
  - id: orders
    uri: lb://ORDER-SERVICE
    predicates: [ "Path=/orders/**" ]
"#,
        );
        assert_eq!(
            find(&t, "GET", "/orders/stats", &[("x-tenant", "acme")]),
            Some("admin-stats")
        );
        assert_eq!(
            find(&t, "GET", "/orders/stats", &[("x-tenant", "other")]),
            Some("orders")
        );
        assert_eq!(
            find(&t, "POST", "/orders/stats", &[("x-tenant", "acme")]),
            Some("orders")
        );
        assert_eq!(
            find(&t, "GET", "/x?debug=true", &[("host", "eu.shop.test")]),
            Some("host")
        );
        // As in Spring: the port is part of the host matched, `**` may be no label,
        // a value is matched decoded.
        assert_eq!(
            find(&t, "GET", "/x?debug=true", &[("host", "eu.shop.test:8080")]),
            None
        );
        assert_eq!(
            find(&t, "GET", "/x?debug=tr%75e", &[("host", "shop.test")]),
            Some("host")
        );
        // A header is a list of comma-separated values; an empty one is none.
        assert_eq!(
            find(&t, "GET", "/orders/stats", &[("x-tenant", "other, globex")]),
            Some("admin-stats")
        );
        assert_eq!(
            find(&t, "GET", "/orders/stats", &[("x-tenant", "")]),
            Some("orders")
        );
        // No optional trailing slash; literal segments compared decoded.
        assert_eq!(
            find(&t, "GET", "/orders/stats/", &[("x-tenant", "acme")]),
            Some("orders")
        );
        assert_eq!(
            find(&t, "GET", "/%6Frders/stats", &[("x-tenant", "acme")]),
            Some("admin-stats")
        );
        assert_eq!(
            find(&t, "GET", "/x?debug=no", &[("host", "eu.shop.test")]),
            None
        );
        assert_eq!(
            find(&t, "GET", "/x?debug=true", &[("host", "eushop.test")]),
            None
        );
        assert_eq!(
            t.routes
                .iter()
                .find(|r| r.id == "orders")
                .map(|r| r.upstream.clone()),
            Some(Upstream::Service("order-service".into()))
        );
    }

    #[test]
    fn the_clock_and_the_draw_are_read_only_for_tables_that_use_them() {
        let (get, uri, headers) = (Method::GET, Uri::from_static("/a"), HeaderMap::new());
        let plain = table("routes: [{id: a, uri: 'lb://x', predicates: ['Path=/a']}]");
        let facts = plain.facts_of(&get, &uri, &headers, None);
        assert_eq!((facts.now_ms, facts.draw), (0, 0));
        let timed =
            table("routes: [{id: a, uri: 'lb://x', predicates: ['After=2020-01-01T00:00:00Z']}]");
        let facts = timed.facts_of(&get, &uri, &headers, None);
        assert!(facts.now_ms > 1_577_836_800_000, "{}", facts.now_ms);
        assert_eq!(timed.find(&facts).map(|r| r.id.as_str()), Some("a"));
        let weighted = table(
            "routes: [{id: a, uri: 'lb://x', predicates: ['Weight=g, 1']}, {id: b, uri: 'lb://y', predicates: ['Weight=g, 1']}]",
        );
        let draws: std::collections::HashSet<u64> = (0..8)
            .map(|_| weighted.facts_of(&get, &uri, &headers, None).draw)
            .collect();
        assert!(draws.len() > 1, "a fresh draw per request: {draws:?}");
    }

    #[test]
    fn time_cookie_address_and_weight_predicates_as_spring_cloud_gateway_has_them() {
        let t = table(
            r#"
routes:
  - {id: after, uri: "lb://a", predicates: ["Path=/t", "After=2026-01-20T17:42:47.789-07:00[America/Denver]"]}
  - {id: before, uri: "lb://a", predicates: ["Path=/b", "Before=2026-01-20T17:42:47.789-07:00[America/Denver]"]}
  - {id: between, uri: "lb://a", predicates: ["Path=/w", "Between=2026-01-01T00:00:00Z, 2026-02-01T00:00:00Z"]}
  - {id: cookie, uri: "lb://a", predicates: ["Path=/c", "Cookie=flavour, ch.p"]}
  - {id: office, uri: "lb://a", predicates: ["Path=/r", "RemoteAddr=10.0.0.0/24"]}
  - {id: proxied, uri: "lb://a", predicates: ["Path=/x", "XForwardedRemoteAddr=192.168.0.0/16"]}
  - {id: blue, uri: "lb://blue", predicates: ["Path=/g", "Weight=canary, 8"]}
  - {id: green, uri: "lb://green", predicates: ["Path=/g", "Weight=canary, 2"]}
"#,
        );
        let get = Method::GET;
        let judge = |uri: &str, headers: &[(&str, &str)], now_ms: u64, draw: u64| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let uri: Uri = uri.parse().unwrap();
            let facts = RequestFacts {
                method: &get,
                uri: &uri,
                headers: &map,
                peer: Some([10, 0, 0, 7].into()),
                now_ms,
                draw,
            };
            t.find(&facts).map(|r| r.id.clone())
        };
        let instant = parse_instant("2026-01-20T17:42:47.789-07:00").unwrap();
        assert_eq!(instant, 1_768_956_167_789);
        assert_eq!(judge("/t", &[], instant + 1, 0).as_deref(), Some("after"));
        assert_eq!(judge("/t", &[], instant - 1, 0), None);
        assert_eq!(judge("/b", &[], instant - 1, 0).as_deref(), Some("before"));
        assert_eq!(judge("/w", &[], instant, 0).as_deref(), Some("between"));
        assert_eq!(judge("/w", &[], instant + 30 * 86_400_000, 0), None);
        let cookie = [("cookie", "session=x; flavour=chip")];
        assert_eq!(judge("/c", &cookie, 0, 0).as_deref(), Some("cookie"));
        assert_eq!(judge("/c", &[("cookie", "flavour=mint")], 0, 0), None);
        assert_eq!(
            judge("/r", &[], 0, 0).as_deref(),
            Some("office"),
            "peer 10.0.0.7"
        );
        // The nearest proxy's view is the last X-Forwarded-For entry.
        let via = [("x-forwarded-for", "203.0.113.9, 192.168.4.4")];
        assert_eq!(judge("/x", &via, 0, 0).as_deref(), Some("proxied"));
        let spoofed = [("x-forwarded-for", "192.168.4.4, 203.0.113.9")];
        assert_eq!(judge("/x", &spoofed, 0, 0), None);
        let junk_last = [("x-forwarded-for", "192.168.4.4, junk")];
        assert_eq!(judge("/x", &junk_last, 0, 0), None);
        // Every request lands on exactly one route of the group, 80/20.
        let blue = (0..10_000u64)
            .filter(|draw| {
                judge("/g", &[], 0, draw.wrapping_mul(0x9E37_79B9_7F4A_7C15)).as_deref()
                    == Some("blue")
            })
            .count();
        assert!((7_600..8_400).contains(&blue), "{blue} of 10000 to blue");
        assert!((0..1000u64).all(|d| judge("/g", &[], 0, d).is_some()));

        for (yaml, wanted) in [
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['Between=2026-02-01T00:00:00Z, 2026-01-01T00:00:00Z']}]",
                "earlier",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['After=yesterday']}]",
                "not an instant",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['RemoteAddr=office']}]",
                "not a network",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['Weight=canary']}]",
                "whole number",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['Weight=canary, 0']}]",
                "no positive weight",
            ),
        ] {
            let e = RouteTable::from_yaml(yaml).unwrap_err();
            assert!(e.to_string().contains(wanted), "{yaml}: {e}");
        }
    }

    #[test]
    fn a_spring_cloud_gateway_application_yml_loads_unchanged() {
        // As a Spring Boot app's application.yml has it: other Spring settings around,
        // SCG 4.3's `server.webflux` prefix, camelCase `defaultFilters`, dotted args.
        let spring = r#"
server:
  port: 8080
spring:
  application:
    name: edge
  cloud:
    gateway:
      server:
        webflux:
          defaultFilters: [SecureHeaders]
          routes:
            - id: orders
              uri: lb://order-service
              order: 1
              predicates:
                - Path=/orders/**
                - Method=GET,POST
              filters:
                - name: RequestRateLimiter
                  args:
                    redis-rate-limiter.replenishRate: 10
                    redis-rate-limiter.burstCapacity: 20
eureka:
  client:
    serviceUrl:
      defaultZone: http://localhost:8761/eureka/
"#;
        let t = table(spring);
        assert_eq!(find(&t, "GET", "/orders/1", &[]), Some("orders"));
        let route = &t.routes[0];
        assert!(
            matches!(route.plan.response[..], [ResponseEdit::SecureHeaders]),
            "{:?}",
            route.plan
        );
        assert_eq!(route.plan.limiters.len(), 1);
        assert_eq!(
            route.described.filters[1],
            "RequestRateLimiter=redis-rate-limiter.burstCapacity: 20, redis-rate-limiter.replenishRate: 10"
        );
        assert_eq!(
            route.described.predicate(),
            "(Path=/orders/** && Method=GET, POST)"
        );

        // The pre-4.3 prefix, written with dotted keys.
        let dotted = "spring.cloud.gateway.routes: [{id: a, uri: 'lb://x', predicates: [Path=/a]}]\n\
                      spring.cloud.gateway.default-filters: [SecureHeaders]\n";
        let t = table(dotted);
        assert_eq!(find(&t, "GET", "/a", &[]), Some("a"));
        assert_eq!(t.routes[0].plan.response.len(), 1);
    }

    #[test]
    fn spring_gateway_settings_this_gateway_lacks_are_refused_by_name() {
        let cases = [
            (
                "spring: {cloud: {gateway: {httpclient: {connect-timeout: 1000}, routes: []}}}",
                "spring.cloud.gateway.httpclient",
            ),
            (
                "spring.cloud.gateway.server.webflux: {discovery: {locator: {enabled: true}}}",
                "spring.cloud.gateway.server.webflux.discovery",
            ),
            (
                "spring.cloud.gateway.server.webmvc.routes: []",
                "spring.cloud.gateway.server.webmvc",
            ),
            (
                "spring.cloud.gateway.routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], colour: red}]",
                "spring.cloud.gateway",
            ),
        ];
        for (yaml, field) in cases {
            let e = RouteTable::from_yaml(yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
    }

    #[test]
    fn bad_routes_name_the_route_and_the_field() {
        let cases = [
            (
                "routes: [{id: a, uri: 'ftp://x', predicates: [Path=/a]}]",
                "a",
                "uri",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: []}]",
                "a",
                "predicates",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Colour=red]}]",
                "a",
                "predicates[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: [StripPrefix=two]}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['Header=X-A,(']}]",
                "a",
                "predicates[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a]}, {id: a, uri: 'lb://y', predicates: [Path=/b]}]",
                "a",
                "id",
            ),
            (
                "default-filters: [Nope]\nroutes: []",
                "-",
                "default-filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: [{name: CircuitBreaker, args: {name: b, fallbackUri: 'lb://elsewhere'}}]}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: [SetStatus=LOUD]}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: ['RedirectTo=200, https://x']}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: ['AddResponseHeader=X-A']}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['Host={t:[a-z]+}.example.org']}]",
                "a",
                "predicates[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: ['Host={t}-api.example.org']}]",
                "a",
                "predicates[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: ['RedirectTo=302, https://x, sometimes']}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: [{name: AddResponseHeader, args: {name: X-A, value: b, override: maybe}}]}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: ['DedupeResponseHeader=Vary, KEEP_ALL']}]",
                "a",
                "filters[0]",
            ),
            (
                "routes: [{id: a, uri: 'lb://x', predicates: [Path=/a], filters: ['AddRequestHeadersIfNotPresent=X-A']}]",
                "a",
                "filters[0]",
            ),
        ];
        for (yaml, route, field) in cases {
            let e = RouteTable::from_yaml(yaml).unwrap_err();
            assert_eq!(
                (e.route.as_str(), e.field.as_str()),
                (route, field),
                "{yaml}: {e}"
            );
        }
    }

    #[test]
    fn a_routes_own_retry_and_breaker_replace_the_defaults() {
        let t = table(
            r#"
default-filters: [SecureHeaders, "Retry=1", "CircuitBreaker=shared"]
routes:
  - id: a
    uri: lb://x
    predicates: [Path=/a/**]
    filters: ["Retry=5", "CircuitBreaker=own"]
  - id: b
    uri: lb://x
    predicates: [Path=/b/**]
"#,
        );
        let own = &t.routes[0].plan;
        assert_eq!(own.retry.retries, 5);
        assert_eq!(own.breaker.as_ref().map(|b| b.name.as_str()), Some("own"));
        let defaults = &t.routes[1].plan;
        assert_eq!(defaults.retry.retries, 1);
        assert_eq!(
            defaults.breaker.as_ref().map(|b| b.name.as_str()),
            Some("shared")
        );
    }

    #[test]
    fn filters_parse_with_their_arguments() {
        let t = table(
            r#"
default-filters: [SecureHeaders]
routes:
  - id: a
    uri: lb://x
    predicates: [Path=/a/**]
    filters:
      - StripPrefix=1
      - RewritePath=/a/(?<rest>.*), /v1/${rest}
      - AddRequestHeader=X-From, gateway
      - RemoveRequestHeader=Cookie
      - AddResponseHeader=X-Route, a
      - name: RequestSize
        args: { maxSize: 2KB }
"#,
        );
        let plan = &t.routes[0].plan;
        assert!(
            matches!(
                plan.response[..],
                [ResponseEdit::SecureHeaders, ResponseEdit::Add(..)]
            ),
            "defaults come first: {plan:?}"
        );
        assert!(matches!(
            &plan.path[..],
            [PathEdit::Strip(1), PathEdit::Rewrite(_, r)] if r == "/v1/${rest}"
        ));
        assert!(matches!(
            plan.headers[..],
            [HeaderEdit::Add(..), HeaderEdit::Remove(_)]
        ));
        assert_eq!(plan.body_limit, Some(2048));
    }

    #[test]
    fn host_variables_fill_filters_beside_paths_and_the_later_predicate_wins() {
        let t = table(
            r#"
routes:
  - id: a
    uri: lb://x
    predicates: ['Path=/a/{id}/{tenant}', 'Host={Tenant}.*.example.org', 'Host=**.{tenant}.test']
"#,
        );
        let route = &t.routes[0];
        assert_eq!(
            route.template_variables("/a/7/path", "Acme.eu.EXAMPLE.org"),
            [
                ("id", "7".to_owned()),
                ("tenant", "path".to_owned()),
                ("Tenant", "Acme".to_owned())
            ],
            "names as written, values as the client wrote them"
        );
        assert_eq!(
            route.template_variables("/a/7/path", "x.shop.test"),
            [("id", "7".to_owned()), ("tenant", "shop".to_owned())],
            "the Host's value replaces the Path's"
        );
        for (pattern, host, matched) in [
            ("{t}.example.org", "a.example.org", true),
            ("{t}.example.org", "example.org", false),
            ("{t}.example.org", ".example.org", false),
            ("{t}.example.org", "a.b.example.org", false),
            ("{t}.example.org", "a.example.org:8443", false),
            ("{t}.example.org", "a-1_b.example.org", true),
            ("{t}.example.org", "a?x=1.example.org", false),
            ("{t}.example.org", "a%2f.example.org", false),
            ("x.{t}", "x.org:8443", false),
            ("**.example.org", "example.org", true),
            ("**.example.org", "a.b.example.org", true),
            ("**.example.org", "badexample.org", false),
        ] {
            assert_eq!(
                host_captures(pattern, host).is_some(),
                matched,
                "{pattern} {host}"
            );
        }
    }

    #[test]
    fn redirect_and_add_response_header_take_springs_third_argument() {
        let t = table(
            r#"
routes:
  - id: a
    uri: lb://x
    predicates: [Path=/a]
    filters:
      - RedirectTo=302, https://x.test/new, true
      - AddResponseHeader=X-A, 1, false
      - name: AddResponseHeader
        args: {name: X-B, value: '2', override: 'true'}
  - id: b
    uri: lb://x
    predicates: [Path=/b]
    filters:
      - name: RedirectTo
        args: {status: 301, url: 'https://x.test/old'}
"#,
        );
        let plan = &t.routes[0].plan;
        let redirect = plan.redirect.as_ref().expect("redirect");
        assert!(redirect.include_request_params);
        assert!(matches!(
            &plan.response[..],
            [ResponseEdit::AddIfBlank(a, _), ResponseEdit::Add(b, _)] if a == "x-a" && b == "x-b"
        ));
        let redirect = t.routes[1].plan.redirect.as_ref().expect("redirect");
        assert!(!redirect.include_request_params, "off unless asked");
        assert_eq!(redirect.location(Some("a=1")), "https://x.test/old");
    }
}

#[cfg(test)]
mod rewrite_location_tests {
    use super::*;

    fn rewrite(shortcut: &str) -> RewriteLocation {
        match parse_filter("r", 0, &Value::String(shortcut.into())) {
            Ok(Filter::Response(ResponseEdit::RewriteLocation(rewrite))) => *rewrite,
            other => panic!("{shortcut}: {other:?}"),
        }
    }

    fn location(rewrite: &RewriteLocation, location: &str, path: &str) -> String {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::LOCATION,
            HeaderValue::from_str(location).expect("value"),
        );
        rewrite.apply(&mut headers, Some("shop.example.org"), path);
        headers[axum::http::header::LOCATION]
            .to_str()
            .expect("text")
            .to_owned()
    }

    #[test]
    fn the_upstreams_address_becomes_the_one_the_client_asked() {
        let default = rewrite("RewriteLocationResponseHeader");
        assert_eq!(
            location(&default, "http://order-service:8081/orders/1", "/orders"),
            "http://shop.example.org/orders/1"
        );
        // As in the request: a client that asked without a version gets none back.
        assert_eq!(
            location(&default, "https://10.0.0.7:8443/v2/orders/1", "/orders"),
            "https://shop.example.org/orders/1"
        );
        assert_eq!(
            location(&default, "https://10.0.0.7:8443/v2/orders/1", "/v2/orders"),
            "https://shop.example.org/v2/orders/1"
        );
        // Relative locations, other schemes and bare hosts are left alone, as Spring
        // leaves them.
        for untouched in ["/orders/1", "mailto:a@b.c", "http://order-service:8081"] {
            assert_eq!(location(&default, untouched, "/orders"), untouched);
        }
    }

    #[test]
    fn the_shortcut_arguments_set_stripping_header_host_and_protocols() {
        let never = rewrite("RewriteLocationResponseHeader=NEVER_STRIP, Location, , ");
        assert_eq!(
            location(&never, "http://svc:1/v1/a", "/a"),
            "http://shop.example.org/v1/a"
        );
        let always =
            rewrite("RewriteLocationResponseHeader=ALWAYS_STRIP, Location, api.example.org");
        assert_eq!(
            location(&always, "http://svc:1/v1/a", "/v1/a"),
            "http://api.example.org/a"
        );
        // Empty arguments are dropped, as Spring drops them: `ftp` is the third, the
        // host.
        let gap = rewrite("RewriteLocationResponseHeader=AS_IN_REQUEST, Location, , ftp");
        assert_eq!(location(&gap, "http://svc:1/a", "/a"), "http://ftp/a");
        assert!(matches!(
            parse_filter(
                "r",
                0,
                &Value::String("RewriteLocationResponseHeader=SOMETIMES".into())
            ),
            Err(e) if e.to_string().contains("NEVER_STRIP")
        ));
    }
}

#[cfg(test)]
mod profile_tests {
    use super::*;

    const FILE: &str = r#"
spring:
  cloud:
    gateway:
      routes:
        - id: everywhere
          uri: lb://order-service
          predicates: [Path=/orders/**]
---
spring:
  config:
    activate:
      on-profile: prod
spring.cloud.gateway.server.webflux.routes:
  - id: in-prod
    uri: lb://order-service
    predicates: [Path=/orders/**]
---
spring.config.activate.on-profile: "!prod"
spring.cloud.gateway.default-filters: [SecureHeaders]
"#;

    fn ids(profiles: &[&str]) -> (Vec<String>, usize) {
        let profiles: Vec<String> = profiles.iter().map(|p| (*p).to_owned()).collect();
        let table = RouteTable::from_yaml_for(FILE, &profiles).expect("loads");
        let ids = table.routes.iter().map(|r| r.id.clone()).collect();
        let filters = table.routes[0].described.filters.len();
        (ids, filters)
    }

    #[test]
    fn documents_count_only_for_their_profiles_and_later_ones_replace_routes() {
        assert_eq!(ids(&[]), (vec!["everywhere".to_owned()], 1));
        assert_eq!(ids(&["prod"]), (vec!["in-prod".to_owned()], 0));
        assert_eq!(ids(&["dev"]).0, ["everywhere"]);
        // A profile-less document may name the active profiles itself.
        let named = format!("spring.profiles.active: prod\n---\n{FILE}");
        let table = RouteTable::from_yaml_for(&named, &[]).expect("loads");
        assert_eq!(table.routes[0].id, "in-prod");
    }
}
