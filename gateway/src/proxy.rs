//! The request path, in the order it runs:
//!
//! 1. **route**: the first route whose predicates match (404 when none does);
//! 2. **authenticate**: a valid bearer token (401), and one of the route's roles (403),
//!    so a rejected request never reaches a service;
//! 3. **limit**: the route's `RequestSize` (413);
//! 4. **pick**: an `UP` instance of the route's service from the discovery cache,
//!    round robin (503 when there is none);
//! 5. **rewrite**: identity headers a client could forge are dropped, the route's
//!    request filters run, `X-Forwarded-*`, `X-Request-Id` and `traceparent` are set;
//! 6. **forward** with the route's timeouts (502 when the instance cannot be reached,
//!    504 when it does not answer in time), streaming both bodies;
//! 7. **respond**: hop-by-hop and upstream CORS headers dropped, response filters run.
//!
//! Every failure is a problem+json that names the service.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use shared::{Problem, auth::AuthError, now_ms};

use crate::{
    Gateway,
    routes::{Filter, Route, Upstream},
};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Identity headers only the gateway may set; a client's copies are dropped.
static FORGEABLE: [HeaderName; 4] = [
    HeaderName::from_static("x-user-id"),
    HeaderName::from_static("x-user-roles"),
    HeaderName::from_static("x-authenticated-user"),
    HeaderName::from_static("x-forwarded-user"),
];

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Spring Cloud Gateway's `SecureHeaders` defaults, each set where the response has
/// none.
static SECURE_HEADERS: [(HeaderName, HeaderValue); 7] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
    (header::X_XSS_PROTECTION, HeaderValue::from_static("0")),
    (
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=631138519"),
    ),
    (
        HeaderName::from_static("x-download-options"),
        HeaderValue::from_static("noopen"),
    ),
    (
        HeaderName::from_static("x-permitted-cross-domain-policies"),
        HeaderValue::from_static("none"),
    ),
];

/// The fallback handler: everything that is not the gateway's own endpoint.
pub async fn forward(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    use tracing::Instrument;
    let started = Instant::now();
    drop_untrusted_forwarded(request.headers_mut(), client.ip(), &gateway.trusted_proxies);
    let request_id = request
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| {
            v.to_str()
                .ok()
                .and_then(shared::telemetry::request_id)
                .is_some()
        })
        .cloned()
        .unwrap_or_else(new_request_id);
    // The server span, the child of the caller's trace when it sent one, made before
    // anything logs so that every line of this request names the trace.
    let span = tracing::info_span!(
        "http",
        otel.name = %request.method(),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        request_id = request_id.to_str().unwrap_or("-"),
        http.response.status_code = tracing::field::Empty,
    );
    let incoming = request
        .headers()
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| shared::telemetry::trace_id(v).is_some())
        .map(str::to_owned);
    // The gateway is the edge: a client's trace is continued only when it comes
    // through a trusted proxy or `client_traces` allows it; otherwise the gateway
    // starts the trace (and decides its sampling) and links the client's context.
    let believed = gateway.client_traces
        || shared::networks::any_contains(&gateway.trusted_proxies, client.ip());
    let incoming = match incoming {
        Some(context) if !believed => {
            shared::telemetry::link_trace(&span, &context);
            request.headers_mut().remove(&TRACEPARENT);
            None
        }
        other => other,
    };
    shared::telemetry::continue_trace(&span, incoming.as_deref());
    // Without the span layer (no subscriber installed) the trace is still carried:
    // the caller's as it came, or one started here.
    if shared::telemetry::traceparent_of(&span).is_none() {
        let traceparent = match incoming {
            Some(_) => request.headers()[&TRACEPARENT].clone(),
            None => {
                let started = new_traceparent();
                request
                    .headers_mut()
                    .insert(TRACEPARENT.clone(), started.clone());
                started
            }
        };
        if let Some(trace) = traceparent
            .to_str()
            .ok()
            .and_then(shared::telemetry::trace_id)
        {
            span.record("trace_id", trace);
        }
    }
    forward_in_span(gateway, client, request, request_id, started)
        .instrument(span)
        .await
}

async fn forward_in_span(
    gateway: Arc<Gateway>,
    client: SocketAddr,
    request: Request,
    request_id: HeaderValue,
    started: Instant,
) -> Response {
    if let Err(response) =
        crate::limits::check_header_size(request.headers(), gateway.max_header_bytes)
    {
        return response;
    }
    if let Some(response) = gateway.cors.preflight(request.method(), request.headers()) {
        return response;
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    let method = request.method().clone();
    let routes = gateway.routes.load_full();
    let facts = crate::routes::RequestFacts::of(
        request.method(),
        request.uri(),
        request.headers(),
        Some(client.ip()),
    );
    let route = routes.find(&facts);
    let route_id = route.map_or("-", |r| r.id.as_str());
    let mut trace = Trace::default();
    let mut response = match route {
        None => {
            trace.reason = Some("no route");
            Problem::not_found(format!("No route matches {}.", request.uri().path()))
                .into_response()
        }
        Some(route) => {
            match handle(&gateway, route, client, &request_id, request, &mut trace).await {
                Ok(response) | Err(response) => response,
            }
        }
    };
    response
        .headers_mut()
        .insert(X_REQUEST_ID.clone(), request_id.clone());
    gateway
        .cors
        .decorate(origin.as_ref(), response.headers_mut());
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    let span = tracing::Span::current();
    span.record("otel.name", format!("{method} {route_id}"));
    span.record("http.response.status_code", status);
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    match route {
        Some(route) => route
            .metrics
            .record(&route.id, &route.uri, &method, status, elapsed),
        None => crate::routes::RouteMetrics::record_unrouted(&method, status, elapsed),
    }
    tracing::info!(
        target: "access",
        request_id = request_id.to_str().unwrap_or("-"),
        route = route_id,
        instance = trace.instance.as_deref().unwrap_or("-"),
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        retries = trace.retries,
        reason = trace.reason.unwrap_or("-"),
        "request"
    );
    response
}

/// What the access log says about one request beyond its status.
#[derive(Debug, Default)]
struct Trace {
    /// The instance that answered, or the last one tried.
    instance: Option<String>,
    retries: usize,
    /// A short reason when the request failed.
    reason: Option<&'static str>,
}

type Rejection = Response;

async fn handle(
    gateway: &Gateway,
    route: &Route,
    client: SocketAddr,
    request_id: &HeaderValue,
    request: Request,
    trace: &mut Trace,
) -> Result<Response, Rejection> {
    let (mut parts, body) = request.into_parts();
    // A WebSocket handshake: its `Upgrade` is a hop-by-hop header, dropped with the
    // others below, so it is kept aside, with the client's side of the connection.
    let upgrade = websocket_upgrade(&parts.headers);
    let mut client_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    // What the client asked, before any filter edits it: response filters that put
    // the gateway's address back (RewriteLocationResponseHeader) need it.
    let asked = Asked {
        host: parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .map(str::to_owned),
        path: parts.uri.path().to_owned(),
        // The Path predicate's `{variables}`, which header and parameter values may
        // name as Spring allows (`AddRequestHeader=X-Segment, {segment}`); matched
        // only for routes that use them.
        variables: if route.filters.iter().any(Filter::is_templated) {
            route.path_variables(parts.uri.path())
        } else {
            Vec::new()
        },
    };
    // The request as the client sent it, kept only for a route whose breaker has a
    // `fallbackUri`, and only once: a fallback route's own fallback is not followed.
    let fallback = route
        .filters
        .iter()
        .find_map(|f| match f {
            Filter::CircuitBreaker(b) => b.fallback.clone(),
            _ => None,
        })
        .filter(|_| parts.extensions.get::<Forwarded>().is_none())
        .map(|path| Fallback {
            uri: match parts.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path,
            },
            method: parts.method.clone(),
            headers: parts.headers.clone(),
        });

    // Authenticate before anything touches an upstream.
    let claims = gateway
        .verifier
        .verify_request(&parts)
        .await
        .map_err(|e| reject_auth(trace, e))?;
    if !route.roles.is_empty() && !route.roles.iter().any(|r| claims.has_role(r)) {
        trace.reason = Some("forbidden");
        return Err(Problem::forbidden(format!(
            "This route needs one of the roles: {}.",
            route.roles.join(", ")
        ))
        .into_response());
    }

    // Filters that answer without an upstream.
    for filter in &route.filters {
        match filter {
            Filter::RequestHeaderSize(max) => {
                // Per header name, all its values together, as Spring counts: repeating
                // a header does not get round the limit.
                let too_large = parts.headers.keys().find(|name| {
                    let values: usize = parts.headers.get_all(*name).iter().map(|v| v.len()).sum();
                    name.as_str().len() + values > *max
                });
                if let Some(name) = too_large {
                    trace.reason = Some("header too large");
                    return Err(Problem::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        format!("The request header {name} is over {max} bytes."),
                    )
                    .into_response());
                }
            }
            Filter::RedirectTo(status, location) => {
                let mut response = Response::new(Body::empty());
                *response.status_mut() = *status;
                response
                    .headers_mut()
                    .insert(header::LOCATION, location.clone());
                return Ok(response);
            }
            _ => {}
        }
    }

    let mut rate_limit = None;
    for filter in &route.filters {
        if let Filter::RequestRateLimiter(limiter) = filter {
            let key = match limiter.key {
                crate::limits::LimitKey::User => format!("user:{}", claims.sub),
                crate::limits::LimitKey::Ip => format!(
                    "ip:{}",
                    client_address(client.ip(), &parts.headers, &gateway.trusted_proxies)
                ),
            };
            let decision = match &gateway.shared_buckets {
                Some(shared) => shared.check(limiter, &route.id, &key).await,
                None => Some(limiter.check(&key, Instant::now())),
            };
            // Redis did not answer: let it through, unlimited and unlabelled.
            let Some(decision) = decision else {
                continue;
            };
            if !decision.allowed {
                metrics::counter!("gateway_rate_limited_total", "route" => route.id.clone())
                    .increment(1);
                trace.reason = Some("rate limited");
                return Err(limiter.refusal(&decision));
            }
            rate_limit = Some((limiter.clone(), decision));
        }
    }

    // The body: refused when over the route's limit, buffered (and so replayable on
    // another instance) when small or of unknown length under a limit, else streamed.
    let limit = route.filters.iter().find_map(|f| match f {
        Filter::RequestSize(max) => Some(*max),
        _ => None,
    });
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(len), Some(max)) = (declared, limit)
        && len > max
    {
        return Err(too_large(max));
    }
    // Without Content-Length or Transfer-Encoding an HTTP/1.1 request has no body.
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    let bufferable = match (declared, limit) {
        (Some(len), _) => len <= MAX_REPLAY_BYTES,
        (None, Some(_)) => true,
        (None, None) => !chunked,
    };
    let mut body = if bufferable {
        let cap = limit.unwrap_or(MAX_REPLAY_BYTES).max(declared.unwrap_or(0)) as usize;
        let bytes = axum::body::to_bytes(body, cap)
            .await
            .map_err(|_| too_large(cap as u64))?;
        RequestBody::Buffered(bytes)
    } else {
        RequestBody::Streamed(Some(body))
    };

    let Some(path) = rewrite_path(route, parts.uri.path()) else {
        trace.reason = Some("bad path");
        return Err(Problem::bad_request(
            "A path segment of `.` or `..`, or an encoded slash, cannot be placed into this route's path.",
        )
        .into_response());
    };
    let query = rewrite_query(route, parts.uri.query(), &asked.variables);
    let scheme = parts
        .extensions
        .get::<shared::server::Scheme>()
        .map_or("http", |s| s.0);
    prepare_headers(
        &mut parts.headers,
        route,
        client,
        request_id,
        &asked.variables,
        scheme,
    );
    let idempotent =
        route.retry.methods.contains(&parts.method) || parts.headers.contains_key(&IDEMPOTENCY_KEY);
    let timeout = route
        .response_timeout
        .unwrap_or_else(|| gateway.upstream.response_timeout());

    // The breaker judges the upstream only: everything the client got wrong was
    // refused above.
    let breaker = route.filters.iter().find_map(|f| match f {
        Filter::CircuitBreaker(b) => Some(b.clone()),
        _ => None,
    });
    let breaker_statuses: Vec<u16> = breaker
        .as_ref()
        .map(|b| b.failure_statuses.clone())
        .unwrap_or_default();
    let mut permit = None;
    if let Some(breaker) = &breaker
        && let Err(open_for) = breaker.permit(Instant::now())
    {
        trace.reason = Some("circuit open");
        if let Some(fallback) = fallback {
            return fallback
                .forward(gateway, client, request_id, body.replay(), trace)
                .await;
        }
        let seconds = open_for.as_secs().max(1);
        let mut response = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "Requests to this route are paused for {seconds}s after repeated upstream failures (circuit breaker {}).",
                breaker.name
            ),
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        return Err(response);
    } else if let Some(breaker) = breaker {
        permit = Some(crate::breaker::Permit::new(breaker));
    }

    let service = match &route.upstream {
        Upstream::Fixed(_) => route.id.clone(),
        Upstream::Service(service) => service.clone(),
    };
    let budget = gateway.balancer.budget(&service);
    budget.deposit(now_ms());
    let mut tried: Vec<String> = Vec::new();
    // The answer of the last failed attempt, given when nothing is left to try.
    let mut last_failure: Option<Response> = None;
    loop {
        // An instance registered by name is reached at the address its name was
        // checked and pinned to, and told its name in `Host`.
        let (scheme, instance, health, named_host) = match &route.upstream {
            Upstream::Fixed(base) => {
                let (scheme, authority) = base.split_once("://").unwrap_or(("http", base));
                (
                    if scheme == "https" { "https" } else { "http" },
                    authority.to_owned(),
                    gateway.balancer.health(base),
                    None,
                )
            }
            Upstream::Service(name) => {
                let instances = gateway
                    .discovery
                    .as_ref()
                    .map(|d| d.instances(name))
                    .unwrap_or_default();
                let turn = route.turn.fetch_add(1, Ordering::Relaxed);
                match gateway
                    .balancer
                    .pick(&instances, &tried, route.balancing, turn, now_ms())
                {
                    // An instance that registered a secure port is reached there over
                    // https, by its registered name so that its certificate can be
                    // checked against it; the name still leads to the address
                    // discovery checked (the connector's pins).
                    Some((instance, health)) if instance.secure_port.is_some() => {
                        let port = instance.secure_port.unwrap_or(instance.port);
                        if let Ok(pinned) = instance.address.parse::<SocketAddr>() {
                            gateway.pins.pin(&instance.host, pinned.ip());
                        }
                        let authority = if instance.host.contains(':') {
                            format!("[{}]:{port}", instance.host)
                        } else {
                            format!("{}:{port}", instance.host)
                        };
                        ("https", authority, health, None)
                    }
                    Some((instance, health)) => {
                        let named = shared::networks::literal(&instance.host).is_none();
                        let host = named
                            .then(|| {
                                HeaderValue::from_str(&format!(
                                    "{}:{}",
                                    instance.host, instance.port
                                ))
                                .ok()
                            })
                            .flatten();
                        ("http", instance.address.clone(), health, host)
                    }
                    None if tried.is_empty() => {
                        trace.reason = Some("no instance");
                        if let Some(permit) = permit.take() {
                            permit.failed();
                        }
                        if let Some(fallback) = fallback {
                            return fallback
                                .forward(gateway, client, request_id, body.replay(), trace)
                                .await;
                        }
                        return Err(Problem::unavailable(name)
                            .with_detail(format!(
                                "No instance of {name} is available right now; retry later."
                            ))
                            .into_response());
                    }
                    None => {
                        if let Some(permit) = permit.take() {
                            permit.failed();
                        }
                        if let Some(fallback) = fallback {
                            return fallback
                                .forward(gateway, client, request_id, body.replay(), trace)
                                .await;
                        }
                        return Err(
                            last_failure.unwrap_or_else(|| exhausted(&service, tried.len()))
                        );
                    }
                }
            }
        };
        let target = match &query {
            Some(query) => format!("{scheme}://{instance}{path}?{query}"),
            None => format!("{scheme}://{instance}{path}"),
        };
        let Ok(uri) = target.parse::<Uri>() else {
            return Err(
                Problem::bad_request("The request path cannot be forwarded.").into_response(),
            );
        };
        let Some(attempt_body) = body.take() else {
            return Err(exhausted(&service, tried.len()));
        };
        let mut attempt = axum::http::Request::new(attempt_body);
        *attempt.method_mut() = parts.method.clone();
        *attempt.uri_mut() = uri;
        *attempt.headers_mut() = parts.headers.clone();
        if let Some(upgrade) = &upgrade
            && client_upgrade.is_some()
        {
            let headers = attempt.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade.clone());
        }
        if let Some(host) = named_host
            && !attempt.headers().contains_key(header::HOST)
        {
            attempt.headers_mut().insert(header::HOST, host);
        }

        // A client span per attempt: a retry on another instance is a span of its
        // own, and the upstream's server span is its child.
        let attempt_span = tracing::info_span!(
            "upstream",
            otel.name = %format_args!("{} {service}", parts.method),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            peer.service = %service,
            server.address = %instance,
            http.response.status_code = tracing::field::Empty,
        );
        if let Some(traceparent) = shared::telemetry::traceparent_of(&attempt_span)
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            attempt
                .headers_mut()
                .insert(TRACEPARENT.clone(), traceparent);
        }
        let sent = {
            use tracing::Instrument;
            let _in_flight = health.in_flight();
            tokio::time::timeout(timeout, gateway.client().request(attempt))
                .instrument(attempt_span.clone())
                .await
        };
        match &sent {
            Ok(Ok(response)) => {
                attempt_span.record("http.response.status_code", response.status().as_u16());
                if response.status().is_server_error() {
                    attempt_span.record("otel.status_code", "error");
                }
            }
            _ => {
                attempt_span.record("otel.status_code", "error");
            }
        }

        // What went wrong, if anything, and whether another instance may be tried.
        let (failure, retryable) = match sent {
            Ok(Ok(response)) if route.retry.statuses.contains(&response.status().as_u16()) => {
                health.failed(now_ms());
                (AttemptFailure::Status(response), idempotent)
            }
            Ok(Ok(response))
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && client_upgrade.is_some() =>
            {
                // The upstream took the WebSocket: from here on the two connections
                // are joined byte for byte, outside any timeout.
                health.succeeded();
                trace.instance = Some(instance);
                trace.retries = tried.len();
                if let Some(permit) = permit.take() {
                    permit.succeeded();
                }
                let Some(client_side) = client_upgrade.take() else {
                    return Err(exhausted(&service, tried.len()));
                };
                return Ok(join_upgrade(response, client_side, &service));
            }
            Ok(Ok(response)) => {
                if response.status().is_server_error() {
                    health.failed(now_ms());
                } else {
                    health.succeeded();
                }
                let mut response = finish(response, route, &asked);
                if let Some((limiter, decision)) = &rate_limit {
                    limiter.headers(decision, response.headers_mut());
                }
                trace.instance = Some(instance);
                trace.retries = tried.len();
                if let Some(permit) = permit.take() {
                    let breaker = permit.breaker();
                    let status = response.status().as_u16();
                    if breaker.is_failure(status) {
                        permit.failed();
                    } else {
                        permit.succeeded();
                    }
                    // As in Spring: an answer is forwarded to the fallback only when
                    // `statusCodes` names its status; a 5xx still counts against the
                    // breaker.
                    if breaker.failure_statuses.contains(&status)
                        && let Some(fallback) = fallback
                    {
                        trace.reason = Some("upstream error status");
                        return fallback
                            .forward(gateway, client, request_id, body.replay(), trace)
                            .await;
                    }
                }
                return Ok(response);
            }
            Ok(Err(e)) if e.is_connect() => {
                health.failed(now_ms());
                tracing::warn!(%service, %instance, error = %e, "upstream unreachable");
                // The request never left: safe to send elsewhere, whatever the method.
                (AttemptFailure::Unreachable, true)
            }
            Ok(Err(e)) => {
                health.failed(now_ms());
                tracing::warn!(%service, %instance, error = %e, "upstream broke the exchange");
                (AttemptFailure::Broken, idempotent)
            }
            Err(_) => {
                health.failed(now_ms());
                (AttemptFailure::Timeout, idempotent)
            }
        };
        tried.push(instance.clone());
        trace.instance = Some(instance.clone());
        trace.retries = tried.len() - 1;
        trace.reason = Some(match &failure {
            AttemptFailure::Status(_) => "upstream error status",
            AttemptFailure::Unreachable => "upstream unreachable",
            AttemptFailure::Broken => "upstream broke the exchange",
            AttemptFailure::Timeout => "upstream timeout",
        });
        metrics::counter!(
            "gateway_upstream_failures_total",
            "service" => service.clone(),
            "instance" => instance.clone(),
            "reason" => trace.reason.unwrap_or("-")
        )
        .increment(1);
        // A failure to get any answer always goes to the fallback; an answer, only
        // when `statusCodes` names its status.
        let to_fallback = match &failure {
            AttemptFailure::Status(response) => {
                breaker_statuses.contains(&response.status().as_u16())
            }
            _ => true,
        };
        let answer = match failure {
            AttemptFailure::Status(response) => finish(response, route, &asked),
            AttemptFailure::Unreachable | AttemptFailure::Broken => Problem::new(
                StatusCode::BAD_GATEWAY,
                format!("{service} could not be reached or broke the connection."),
            )
            .into_response(),
            AttemptFailure::Timeout => Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                format!("{service} did not answer within {}ms.", timeout.as_millis()),
            )
            .into_response(),
        };
        let may_retry = retryable
            && tried.len() <= route.retry.retries
            && body.replayable()
            && budget.withdraw(now_ms());
        if !may_retry {
            if let Some(permit) = permit.take() {
                permit.failed();
            }
            if to_fallback && let Some(fallback) = fallback {
                return fallback
                    .forward(gateway, client, request_id, body.replay(), trace)
                    .await;
            }
            return Err(answer);
        }
        metrics::counter!("gateway_retries_total", "route" => route.id.clone()).increment(1);
        last_failure = Some(answer);
    }
}

/// Requests up to this size are buffered so another instance can be tried.
const MAX_REPLAY_BYTES: u64 = 64 * 1024;

/// A request body that may be sent once (streamed) or again (buffered).
enum RequestBody {
    Streamed(Option<Body>),
    Buffered(axum::body::Bytes),
}

impl RequestBody {
    fn take(&mut self) -> Option<Body> {
        match self {
            RequestBody::Streamed(body) => body.take(),
            RequestBody::Buffered(bytes) => Some(Body::from(bytes.clone())),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, RequestBody::Buffered(_))
    }

    /// The body again for a fallback: a buffered one as it was, a streamed one (spent
    /// on the first attempt) as nothing.
    fn replay(&self) -> Body {
        match self {
            RequestBody::Buffered(bytes) => Body::from(bytes.clone()),
            RequestBody::Streamed(_) => Body::empty(),
        }
    }
}

/// Marks a request a fallback forwarded, so its own route's fallback is not followed.
#[derive(Debug, Clone, Copy)]
struct Forwarded;

/// Where a breaker's `fallbackUri: forward:/path` sends a request, and the request
/// as the client sent it.
struct Fallback {
    uri: String,
    method: axum::http::Method,
    headers: HeaderMap,
}

impl Fallback {
    /// Runs the request again through the routes, as if the client had asked the
    /// fallback's path: the route that matches it answers (a cached page, a default,
    /// a service that degrades gracefully). No route for it is a 503 naming it.
    async fn forward(
        self,
        gateway: &Gateway,
        client: SocketAddr,
        request_id: &HeaderValue,
        body: Body,
        trace: &mut Trace,
    ) -> Result<Response, Rejection> {
        let Ok(uri) = self.uri.parse::<Uri>() else {
            return Err(Problem::unavailable("fallback").into_response());
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = uri;
        *request.headers_mut() = self.headers;
        request.extensions_mut().insert(Forwarded);
        let routes = gateway.routes.load_full();
        let facts = crate::routes::RequestFacts::of(
            request.method(),
            request.uri(),
            request.headers(),
            Some(client.ip()),
        );
        let Some(route) = routes.find(&facts) else {
            trace.reason = Some("fallback has no route");
            return Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "The upstream failed and its fallback {} matches no route.",
                    request.uri().path()
                ),
            )
            .into_response());
        };
        metrics::counter!("gateway_fallbacks_total", "route" => route.id.clone()).increment(1);
        Box::pin(handle(gateway, route, client, request_id, request, trace)).await
    }
}

/// Why an attempt failed.
enum AttemptFailure {
    Status(hyper::Response<hyper::body::Incoming>),
    Unreachable,
    Broken,
    Timeout,
}

fn too_large(max: u64) -> Rejection {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("The body may be at most {max} bytes on this route."),
    )
    .into_response()
}

fn reject_auth(trace: &mut Trace, error: AuthError) -> Rejection {
    trace.reason = Some("unauthenticated");
    error.into_response()
}

fn exhausted(service: &str, attempts: usize) -> Response {
    Problem::new(
        StatusCode::BAD_GATEWAY,
        format!("{service} failed on {attempts} instance(s)."),
    )
    .into_response()
}

/// The upstream's response as the client gets it.
/// The client's own host and path, as it sent them, and the path's variables.
struct Asked<'r> {
    host: Option<String>,
    path: String,
    variables: Vec<(&'r str, String)>,
}

/// `value` with each `{name}` replaced by that path variable, percent-decoded (a
/// value that would not be a valid header then keeps the variable as matched).
fn expand(value: &HeaderValue, variables: &[(&str, String)]) -> HeaderValue {
    if variables.is_empty() || !value.as_bytes().contains(&b'{') {
        return value.clone();
    }
    let Ok(text) = value.to_str() else {
        return value.clone();
    };
    let mut filled = text.to_owned();
    for (name, raw) in variables {
        let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
        let fits = HeaderValue::from_str(&decoded).is_ok();
        filled = filled.replace(
            &format!("{{{name}}}"),
            if fits { decoded.as_ref() } else { raw.as_str() },
        );
    }
    HeaderValue::from_str(&filled).unwrap_or_else(|_| value.clone())
}

/// The `Upgrade` value of a WebSocket handshake (`Connection: upgrade` and
/// `Upgrade: websocket`), else `None`.
fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let connection_upgrades = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    (connection_upgrades && upgrade.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .then(|| upgrade.clone())
}

/// Answers the client `101` with the upstream's handshake headers, and joins the two
/// upgraded connections until either side closes.
fn join_upgrade(
    mut upstream: hyper::Response<hyper::body::Incoming>,
    client: hyper::upgrade::OnUpgrade,
    service: &str,
) -> Response {
    let upstream_side = hyper::upgrade::on(&mut upstream);
    let service = service.to_owned();
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::warn!(%service, %error, "a WebSocket upgrade did not complete");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        metrics::gauge!("gateway_websockets_open", "service" => service.clone()).increment(1.0);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(%service, %error, "a WebSocket connection ended");
        }
        metrics::gauge!("gateway_websockets_open", "service" => service).decrement(1.0);
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = upstream.headers().clone();
    response
}

fn finish(
    upstream_response: hyper::Response<hyper::body::Incoming>,
    route: &Route,
    asked: &Asked<'_>,
) -> Response {
    let (mut parts, body) = upstream_response.into_parts();
    for name in &HOP_BY_HOP {
        parts.headers.remove(name);
    }
    // The gateway owns CORS; an upstream's own headers would be doubled or conflict.
    // Collecting nothing allocates nothing: the common case costs one scan.
    let cors: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|k| k.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in cors {
        parts.headers.remove(name);
    }
    for filter in &route.filters {
        match filter {
            Filter::AddResponseHeader(name, value) => {
                parts
                    .headers
                    .append(name.clone(), expand(value, &asked.variables));
            }
            Filter::SetResponseHeader(name, value) => {
                parts
                    .headers
                    .insert(name.clone(), expand(value, &asked.variables));
            }
            Filter::RemoveResponseHeader(name) => {
                parts.headers.remove(name);
            }
            Filter::DedupeResponseHeader(names, strategy) => {
                for name in names {
                    dedupe(&mut parts.headers, name, *strategy);
                }
            }
            Filter::RewriteResponseHeader(name, regex, replacement) => {
                let rewritten: Vec<HeaderValue> = parts
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .filter_map(|v| {
                        HeaderValue::from_str(&regex.replace_all(v, replacement.as_str())).ok()
                    })
                    .collect();
                if !rewritten.is_empty() {
                    parts.headers.remove(name);
                    for value in rewritten {
                        parts.headers.append(name.clone(), value);
                    }
                }
            }
            Filter::SetStatus(status) => parts.status = *status,
            Filter::SecureHeaders => secure_headers(&mut parts.headers),
            Filter::RewriteLocation(rewrite) => {
                rewrite.apply(&mut parts.headers, asked.host.as_deref(), &asked.path);
            }
            _ => {}
        }
    }
    Response::from_parts(parts, Body::new(body))
}

/// Keeps one value of `name` (or each distinct one), comparing whole values as Spring
/// does: a value holding commas (a cookie's expiry date) is never cut apart.
fn dedupe(headers: &mut HeaderMap, name: &HeaderName, strategy: crate::routes::Dedupe) {
    use crate::routes::Dedupe;
    let values: Vec<HeaderValue> = headers.get_all(name).iter().cloned().collect();
    if values.len() < 2 {
        return;
    }
    let kept: Vec<HeaderValue> = match strategy {
        Dedupe::RetainFirst => values.into_iter().take(1).collect(),
        Dedupe::RetainLast => values.into_iter().last().into_iter().collect(),
        Dedupe::RetainUnique => {
            let mut seen: Vec<HeaderValue> = Vec::new();
            for v in values {
                if !seen.contains(&v) {
                    seen.push(v);
                }
            }
            seen
        }
    };
    headers.remove(name);
    for value in kept {
        headers.append(name.clone(), value);
    }
}

/// The upstream query after `AddRequestParameter` and `RemoveRequestParameter`.
fn rewrite_query(
    route: &Route,
    query: Option<&str>,
    variables: &[(&str, String)],
) -> Option<String> {
    let edits = route.filters.iter().any(|f| {
        matches!(
            f,
            Filter::AddRequestParameter(..) | Filter::RemoveRequestParameter(_)
        )
    });
    if !edits {
        return query.map(str::to_owned);
    }
    let mut pairs: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    for filter in &route.filters {
        match filter {
            Filter::AddRequestParameter(name, value) => {
                let mut value = value.clone();
                for (variable, raw) in variables {
                    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
                    value = value.replace(&format!("{{{variable}}}"), &decoded);
                }
                pairs.push(format!("{}={}", encode_query(name), encode_query(&value)));
            }
            Filter::RemoveRequestParameter(name) => {
                // Compared decoded, as the upstream will read it: `%64ebug` is `debug`.
                pairs.retain(|p| decode_query(p.split('=').next().unwrap_or_default()) != *name);
            }
            _ => {}
        }
    }
    (!pairs.is_empty()).then(|| pairs.join("&"))
}

/// A query component decoded as the upstream reads it (`+` is a space, `%XX` a byte,
/// bytes that are not UTF-8 replaced, a malformed escape kept as written).
fn decode_query(text: &str) -> String {
    form_urlencoded::parse(text.as_bytes())
        .next()
        .map(|(key, _)| key.into_owned())
        .unwrap_or_default()
}

/// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_query(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, NOT_UNRESERVED).to_string()
}

/// The upstream path after `StripPrefix`, `RewritePath`, `SetPath` and `PrefixPath`,
/// in the order the filters are written.
/// `None` when a captured variable would change the path's shape (`..`, an encoded
/// slash): placed into a template it could climb out of the intended prefix.
fn rewrite_path(route: &Route, path: &str) -> Option<String> {
    let original = path;
    let mut path = path.to_owned();
    for filter in &route.filters {
        match filter {
            Filter::SetPath(template) => {
                let mut filled = template.clone();
                for (name, value) in route.path_variables(original) {
                    let lower = value.to_ascii_lowercase();
                    if value == "."
                        || value == ".."
                        || lower.contains("%2f")
                        || lower.contains("%5c")
                        || lower.contains("%2e")
                    {
                        return None;
                    }
                    filled = filled.replace(&format!("{{{name}}}"), &value);
                }
                path = filled;
            }
            Filter::PrefixPath(prefix) => {
                path = format!("{prefix}{path}");
            }
            Filter::StripPrefix(n) => {
                let rest: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).skip(*n).collect();
                path = format!("/{}", rest.join("/"));
            }
            Filter::RewritePath(regex, replacement) => {
                path = regex.replace(&path, replacement.as_str()).into_owned();
            }
            _ => {}
        }
    }
    Some(path)
}

/// The client's address: the TCP peer, or, when the peer is a trusted proxy, the
/// address that proxy saw (the last `X-Forwarded-For` entry). Login throttling and
/// per-address rate limits key on it, so behind a load balancer every client is not
/// one address.
pub fn client_address(
    peer: std::net::IpAddr,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> std::net::IpAddr {
    if !shared::networks::any_contains(trusted, peer) {
        return peer;
    }
    shared::networks::last_forwarded_for(headers)
        .and_then(|last| last.parse().ok())
        .unwrap_or(peer)
}

/// Drops the `X-Forwarded-*` and `Forwarded` headers unless `peer` is a trusted proxy:
/// at the edge a client could write any address or scheme there, and predicates
/// (`XForwardedRemoteAddr`) and services would believe it.
fn drop_untrusted_forwarded(
    headers: &mut HeaderMap,
    peer: std::net::IpAddr,
    trusted: &[ipnet::IpNet],
) {
    if shared::networks::any_contains(trusted, peer) {
        return;
    }
    for name in [&X_FORWARDED_FOR, &X_FORWARDED_PROTO, &X_FORWARDED_HOST] {
        headers.remove(name);
    }
    headers.remove(header::FORWARDED);
}

/// `X-Forwarded-Proto` for the upstream: the incoming chain when every entry is a
/// scheme (anything else is dropped, not passed on), with `ours` appended.
fn forwarded_proto(incoming: Option<&HeaderValue>, ours: &'static str) -> HeaderValue {
    let chain = incoming.and_then(|v| v.to_str().ok()).filter(|chain| {
        chain.len() <= 64
            && chain
                .split(',')
                .all(|p| matches!(p.trim(), "http" | "https" | "ws" | "wss"))
    });
    match chain {
        Some(chain) => HeaderValue::from_str(&format!("{chain}, {ours}"))
            .unwrap_or(HeaderValue::from_static(ours)),
        None => HeaderValue::from_static(ours),
    }
}

fn prepare_headers(
    headers: &mut HeaderMap,
    route: &Route,
    client: SocketAddr,
    request_id: &HeaderValue,
    variables: &[(&str, String)],
    scheme: &'static str,
) {
    for name in HOP_BY_HOP.iter().chain(FORGEABLE.iter()) {
        headers.remove(name);
    }
    let original_host = headers.remove(header::HOST);
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(chain) => HeaderValue::from_str(&format!("{chain}, {}", client.ip())).ok(),
        None => HeaderValue::from_str(&client.ip().to_string()).ok(),
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    // Appended, as Spring Cloud Gateway does, so that behind a load balancer that
    // ended TLS the service still learns the client spoke https (the first entry).
    let proto = forwarded_proto(headers.get(&X_FORWARDED_PROTO), scheme);
    headers.insert(X_FORWARDED_PROTO.clone(), proto);
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    // `forward` started a trace when the caller did not.
    for filter in &route.filters {
        match filter {
            Filter::AddRequestHeader(name, value) => {
                headers.append(name.clone(), expand(value, variables));
            }
            Filter::RemoveRequestHeader(name) => {
                headers.remove(name);
            }
            Filter::SetRequestHeader(name, value) => {
                headers.insert(name.clone(), expand(value, variables));
            }
            Filter::AddRequestHeadersIfNotPresent(pairs) => {
                for (name, value) in pairs {
                    if !headers.contains_key(name) {
                        headers.insert(name.clone(), value.clone());
                    }
                }
            }
            Filter::MapRequestHeader(from, to) => {
                let values: Vec<HeaderValue> = headers.get_all(from).iter().cloned().collect();
                for value in values {
                    headers.append(to.clone(), value);
                }
            }
            Filter::SetRequestHostHeader(host) => {
                headers.insert(header::HOST, host.clone());
            }
            Filter::PreserveHostHeader => {
                if let Some(host) = headers.get(&X_FORWARDED_HOST).cloned() {
                    headers.insert(header::HOST, host);
                }
            }
            _ => {}
        }
    }
}

/// A random UUID (v4) for a request that came without an id.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buffer = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buffer))
        .expect("a UUID is a valid header value")
}

/// `00-<trace id>-<span id>-01`: a new, sampled W3C trace context.
fn new_traceparent() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let random: [u8; 24] = rand::random();
    let (trace, span) = value.split_at_mut(35);
    let digits = trace[3..].iter_mut().chain(span[1..17].iter_mut());
    for (digit, nibble) in digits.zip(random.iter().flat_map(|b| [b >> 4, b & 0xf])) {
        *digit = HEX[usize::from(nibble)];
    }
    HeaderValue::from_bytes(&value).expect("hex digits are a valid header value")
}

/// Spring Cloud Gateway's `SecureHeaders` defaults, where the response has none.
fn secure_headers(headers: &mut HeaderMap) {
    for (name, value) in &SECURE_HEADERS {
        if !headers.contains_key(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Timeouts of the upstream side.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    pub connect_timeout_ms: u64,
    /// From sending the request to the response's headers.
    pub response_timeout_ms: u64,
    /// Pooled connections idle longer are closed; below typical server keep-alive
    /// (Node's 5 s) so the gateway never reuses a connection the server is closing.
    pub pool_idle_timeout_ms: u64,
    /// Networks (CIDR, or single addresses) that discovered instances must lie in to
    /// receive traffic; others are refused and shown in the routes report. Host names
    /// are resolved when discovery sees them. Routes with a fixed `uri` are the
    /// operator's own and are not checked.
    pub instance_networks: Vec<String>,
    /// CA files (PEM) trusted for `https://` upstreams besides the system's roots.
    /// Upstream certificates are always verified.
    pub ca_files: Vec<std::path::PathBuf>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1000,
            response_timeout_ms: 10_000,
            pool_idle_timeout_ms: 4000,
            instance_networks: shared::networks::PRIVATE_NETWORKS
                .map(str::to_owned)
                .to_vec(),
            ca_files: Vec::new(),
        }
    }
}

impl UpstreamSettings {
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_headers_are_believed_from_trusted_proxies_only() {
        let forged = || {
            let mut headers = HeaderMap::new();
            headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("192.168.1.1"));
            headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
            headers
        };
        let balancer: ipnet::IpNet = "10.0.0.0/8".parse().unwrap();
        let mut from_client = forged();
        drop_untrusted_forwarded(&mut from_client, [203, 0, 113, 9].into(), &[balancer]);
        assert!(from_client.is_empty(), "{from_client:?}");
        let mut from_balancer = forged();
        drop_untrusted_forwarded(&mut from_balancer, [10, 1, 2, 3].into(), &[balancer]);
        assert_eq!(from_balancer.len(), 2);
    }

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_names_it() {
        let balancer: ipnet::IpNet = "10.0.0.0/8".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("203.0.113.5, 198.51.100.7"),
        );
        let via_balancer = client_address([10, 0, 0, 2].into(), &headers, &[balancer]);
        assert_eq!(via_balancer, std::net::IpAddr::from([198, 51, 100, 7]));
        let direct = client_address([203, 0, 113, 9].into(), &headers, &[balancer]);
        assert_eq!(direct, std::net::IpAddr::from([203, 0, 113, 9]));
    }

    #[test]
    fn query_keys_are_compared_decoded() {
        assert_eq!(decode_query("%64ebug"), "debug");
        assert_eq!(decode_query("a+b%20c"), "a b c");
        assert_eq!(decode_query("100%"), "100%");
        assert_eq!(decode_query("%zz"), "%zz");
    }

    #[test]
    fn forwarded_proto_keeps_a_load_balancers_scheme_and_drops_junk() {
        let https = HeaderValue::from_static("https");
        assert_eq!(forwarded_proto(Some(&https), "http"), "https, http");
        assert_eq!(forwarded_proto(None, "http"), "http");
        let junk = HeaderValue::from_static("https, javascript");
        assert_eq!(forwarded_proto(Some(&junk), "http"), "http");
    }

    #[test]
    fn a_new_traceparent_is_a_sampled_w3c_context_with_random_ids() {
        let first = new_traceparent();
        let text = first.to_str().unwrap();
        let parts: Vec<&str> = text.split('-').collect();
        assert_eq!(parts.len(), 4, "{text}");
        assert_eq!((parts[0], parts[3]), ("00", "01"), "{text}");
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{text}");
        assert!(
            parts[1..3].iter().all(|id| id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))),
            "lowercase hex ids: {text}"
        );
        assert_ne!(first, new_traceparent(), "ids are random");
    }

    #[test]
    fn a_new_request_id_is_a_random_uuid() {
        let id = new_request_id();
        let parsed = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version(), Some(uuid::Version::Random));
        assert_ne!(id, new_request_id());
    }

    #[test]
    fn secure_headers_keep_what_the_upstream_set() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::X_FRAME_OPTIONS,
            HeaderValue::from_static("SAMEORIGIN"),
        );
        secure_headers(&mut headers);
        assert_eq!(headers[header::X_FRAME_OPTIONS], "SAMEORIGIN");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(headers.len(), SECURE_HEADERS.len());
    }
}
