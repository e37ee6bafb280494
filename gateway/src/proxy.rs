//! The request path. A request runs through named phases, each a small method of
//! [`Exchange`] over the route's compiled [`Plan`], in the order a demanding
//! operator would want them:
//!
//! 1. **edge** (`forward`): the request id, the trace (continued only from trusted
//!    callers), forged `X-Forwarded-*` dropped; then the header size cap and CORS
//!    preflights, which need no route;
//! 2. **match**: the first route whose predicates hold (404 when none does);
//! 3. **authenticate**: a valid bearer token (401) and one of the route's roles (403),
//!    first, so a rejected request never costs a limit, a body read or an upstream;
//! 4. **answer without upstream**: `RequestHeaderSize` (431), `RedirectTo`;
//! 5. **limit**: the route's rate limiters (429), keyed by the caller now known;
//! 6. **read the body**: `RequestSize` (413); small bodies are kept so a retry can
//!    send them again;
//! 7. **edit the request**: the gateway's own headers, then the route's path, query
//!    and header edits in the order written;
//! 8. **admit**: the route's circuit breaker (503 while open);
//! 9. **attempt and retry**: an instance from discovery (503 when there is none), the
//!    attempt with the route's timeout (502, 504), and further instances while the
//!    retry policy and the service's retry budget allow;
//! 10. **edit the response**: hop-by-hop and upstream CORS headers dropped, then the
//!     route's response edits; a breaker's `fallbackUri` answers instead when the
//!     attempts failed;
//! 11. **log** (`forward_in_span`): CORS headers, metrics, the access line.
//!
//! In-flight counts and breaker permits are guards: a client that disconnects
//! mid-request drops them, and with them its count. Every failure is a problem+json
//! that names the service.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::{
    body::Body,
    extract::{ConnectInfo, Request, State},
    http::{
        HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header,
        uri::{Authority, PathAndQuery},
    },
    response::{IntoResponse, Response},
};
use shared::{
    Problem,
    auth::{AuthError, Claims},
    now_ms,
    server::BodyFailure,
};

use crate::{
    Gateway,
    plan::{Asked, FailureKind, HeaderEdit, PathEdit, Plan, QueryEdit, ResponseEdit},
    routes::{Route, Upstream},
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

/// The router's fallback: a path under the gateway's own prefixes that none of its
/// endpoints serves.
pub async fn forward(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |c| c.0);
    forward_request(gateway, request, client).await
}

/// A request for an upstream, as the server hands it over (see [`crate::Front`]); the
/// client's address is the connection's. Its answer is problem+json when it is an
/// error, and has no body when it answers a `HEAD`. (Each `async fn` a request passes
/// through nests its future in its caller's, and moving a future copies it whole: the
/// layers are kept few, and this one is what the connection keeps in place.)
pub async fn forward_request(
    gateway: Arc<Gateway>,
    mut request: Request,
    client: SocketAddr,
) -> Response {
    use tracing::Instrument;
    let head = request.method() == Method::HEAD;
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
    // The gateway is the edge: a client's trace is continued only when it comes
    // through a trusted proxy or `client_traces` allows it; otherwise the gateway
    // starts the trace (and decides its sampling) and links the client's context.
    let believed = gateway.client_traces
        || shared::networks::any_contains(&gateway.trusted_proxies, client.ip());
    let recorded = shared::telemetry::spans_recorded();
    let has_context = request
        .headers()
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| shared::telemetry::trace_id(v).is_some());
    let linked = match has_context && !believed {
        true => request
            .headers_mut()
            .remove(&TRACEPARENT)
            .filter(|_| recorded)
            .and_then(|v| v.to_str().ok().map(str::to_owned)),
        false => None,
    };
    let continued = has_context && believed;
    // The server span, the child of the caller's trace when it sent one, made before
    // anything logs so that every line of this request names the trace.
    let span = if recorded {
        let span = tracing::info_span!(
            "http",
            otel.name = %request.method(),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            request_id = request_id.to_str().unwrap_or("-"),
            http.response.status_code = tracing::field::Empty,
        );
        if let Some(context) = &linked {
            shared::telemetry::link_trace(&span, context);
        }
        let incoming = continued
            .then(|| request.headers().get(&TRACEPARENT))
            .flatten()
            .and_then(|v| v.to_str().ok());
        shared::telemetry::continue_trace(&span, incoming);
        if shared::telemetry::traceparent_of(&span).is_none()
            && let Some(trace) = carry_trace(&gateway, &mut request, continued)
        {
            span.record("trace_id", trace.as_str());
        }
        span
    } else {
        // Without the span layer (spans not exported, or no subscriber at all) the
        // trace is still carried: the caller's as it came, or one started here. The
        // span then has only the fields log lines show, each given at once: a field
        // recorded later costs a second format.
        // The trace id displayed, not debugged (a `&str` field is quoted and escaped
        // character by character): it is hex digits the gateway wrote or checked. The
        // request id may come from the client, and stays quoted.
        let trace = carry_trace(&gateway, &mut request, continued);
        tracing::info_span!(
            "http",
            trace_id = %trace.as_ref().map_or("-", |t| t.as_str()),
            request_id = request_id.to_str().unwrap_or("-"),
        )
    };
    let response = forward_in_span(gateway, client, request, request_id, started)
        .instrument(span)
        .await;
    let response = shared::http::bare_error_as_problem(response).await;
    if head {
        without_body(response)
    } else {
        response
    }
}

/// The answer to a `HEAD`: the headers of the `GET`'s, its length included, and no
/// body, as axum's router answers. HTTP/1 drops a HEAD answer's body by itself; an
/// HTTP/2 client resets a stream whose HEAD answer carries one (the gateway's own
/// problem+json answers do).
fn without_body(response: Response) -> Response {
    use axum::body::HttpBody;
    let (mut parts, body) = response.into_parts();
    if !parts.headers.contains_key(header::CONTENT_LENGTH)
        && let Some(length) = body.size_hint().exact()
    {
        parts.headers.insert(header::CONTENT_LENGTH, length.into());
    }
    Response::from_parts(parts, Body::empty())
}

/// The trace a request carries upstream when no span layer made one: the caller's
/// context as it came when `continued`, else a new one (sampled as configured), set
/// as the request's `traceparent`. Its trace id, for log lines.
fn carry_trace(gateway: &Gateway, request: &mut Request, continued: bool) -> Option<TraceId> {
    if continued {
        let traceparent = request.headers().get(&TRACEPARENT)?.to_str().ok()?;
        return TraceId::of(shared::telemetry::trace_id(traceparent)?);
    }
    let (started, trace) = new_traceparent(rand::random::<f64>() < gateway.sampling_probability);
    request.headers_mut().insert(TRACEPARENT.clone(), started);
    Some(trace)
}

/// A trace id (32 hex digits), kept without an allocation.
struct TraceId([u8; 32]);

impl TraceId {
    fn of(id: &str) -> Option<Self> {
        Some(Self(id.as_bytes().try_into().ok()?))
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("-")
    }
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
    if request.method() == Method::CONNECT {
        return no_tunnel();
    }
    let origin = request.headers().get(header::ORIGIN).cloned();
    let method = request.method().clone();
    let routes = gateway.routes.load_full();
    let facts = routes.facts_of(
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
    if shared::telemetry::spans_recorded() {
        let span = tracing::Span::current();
        span.record("otel.name", format!("{method} {route_id}"));
        span.record("http.response.status_code", status);
        if response.status().is_server_error() {
            span.record("otel.status_code", "error");
        }
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
        instance = trace.instance.as_ref().map_or("-", Authority::as_str),
        status,
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        retries = trace.retries,
        reason = trace.reason.unwrap_or("-"),
        "request"
    );
    response
}

/// The answer to `CONNECT`, which asks a forward proxy for a tunnel: the gateway
/// forwards requests, it opens no tunnels, whatever its routes match.
fn no_tunnel() -> Response {
    let mut response = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "The gateway forwards requests and opens no tunnels: CONNECT is not supported.",
    )
    .into_response();
    response.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"),
    );
    response
}

/// What the access log says about one request beyond its status.
#[derive(Debug, Default)]
struct Trace {
    /// The instance that answered, or the last one tried.
    instance: Option<Authority>,
    retries: usize,
    /// A short reason when the request failed.
    reason: Option<&'static str>,
}

type Rejection = Response;

/// A request that got no answer it can be given (a breaker's refusal, no instance,
/// no connection, no answer in time): what the client gets, unless a breaker's
/// `fallbackUri` answers instead.
struct Failed(Response);

/// One request on its way through its route: what every phase reads.
struct Exchange<'a> {
    gateway: &'a Gateway,
    route: &'a Route,
    plan: &'a Plan,
    client: SocketAddr,
    request_id: &'a HeaderValue,
}

/// The request as the upstream gets it, built once and sent to each instance tried.
struct Outgoing {
    method: Method,
    /// The edited path and query.
    target: PathAndQuery,
    headers: HeaderMap,
    /// Whether it may be sent again after it may have reached an instance.
    idempotent: bool,
    timeout: Duration,
    /// A WebSocket handshake's.
    upgrade: Option<ClientUpgrade>,
}

/// A WebSocket handshake from the client: its `Upgrade` value, the client's side of
/// the connection, and the connection's place under the server's cap, kept while
/// the joined connections live so that they still count (and are not shed).
struct ClientUpgrade {
    value: HeaderValue,
    connection: hyper::upgrade::OnUpgrade,
    place: Option<shared::server::ConnectionPlace>,
}

/// An instance to send an attempt to.
struct Target {
    scheme: &'static str,
    /// None when the address makes no authority: the attempt fails as unreachable.
    authority: Option<Authority>,
    /// Whether another instance is left to try should this one fail: the fixed
    /// upstream is tried again, a service's instances one each.
    others_left: bool,
    /// The registered address of an instance reached by name on its secure port, as
    /// the tried instances are named (its authority is not its address).
    secure_address: Option<String>,
    health: Arc<crate::balancer::InstanceHealth>,
    /// The `Host` the request carries unless it has one already (`PreserveHostHeader`):
    /// an instance registered by name is told its name. Without one, the client names
    /// the authority.
    host: Option<HeaderValue>,
}

impl Target {
    /// The instance as logs name it.
    fn shown(&self) -> &str {
        self.authority.as_ref().map_or("-", Authority::as_str)
    }
}

/// Runs `request` through `route`'s phases; the response, or the refusal the client
/// gets. Not an `async fn`: the phases' future is the caller's to hold, with no layer
/// around it.
fn handle<'a>(
    gateway: &'a Gateway,
    route: &'a Route,
    client: SocketAddr,
    request_id: &'a HeaderValue,
    request: Request,
    trace: &'a mut Trace,
) -> impl std::future::Future<Output = Result<Response, Rejection>> + Send + 'a {
    let exchange = Exchange {
        gateway,
        route,
        plan: &route.plan,
        client,
        request_id,
    };
    exchange.run(request, trace)
}

impl<'a> Exchange<'a> {
    /// The phases, in order. Each returns early with the client's answer when the
    /// request goes no further, so a later phase never runs for a request an earlier
    /// one refused.
    async fn run(self, request: Request, trace: &'a mut Trace) -> Result<Response, Rejection> {
        let (mut parts, body) = request.into_parts();
        let asked = self.asked(&parts);
        // Kept before any edit, and only for a route with a fallback.
        let fallback = self.fallback(&parts);

        // Who is asking comes first: nothing below touches an upstream, a limit or a
        // body for a caller the route does not admit.
        let claims = self.authenticate(&parts, trace).await?;
        // Answers that need no upstream: cheap checks of what was already read.
        if let Some(answer) = self.answer_without_upstream(&parts, trace)? {
            return Ok(answer);
        }
        // Limits count only admitted callers, keyed by who they are.
        let quota = self.limit(&parts, &claims, trace).await?;
        // The body last among the client's parts: reading it is what costs the most.
        let mut body = self.read_body(&parts.headers, body).await?;
        let outgoing = self.edit_request(&mut parts, &asked, trace)?;

        let outcome = match self.admit(trace) {
            Ok(permit) => {
                self.attempts(outgoing, &mut body, permit, &asked, quota.as_ref(), trace)
                    .await
            }
            Err(refused) => Err(refused),
        };
        match (outcome, fallback) {
            (Ok(response), Some(fallback))
                if self
                    .plan
                    .breaker
                    .as_ref()
                    .is_some_and(|b| b.failure_statuses.contains(&response.status())) =>
            {
                // As in Spring: an answer goes to the fallback only when `statusCodes`
                // names its status.
                trace.reason = Some("upstream error status");
                fallback.forward(&self, body.replay(), trace).await
            }
            (Ok(response), _) => Ok(response),
            (Err(_), Some(fallback)) => fallback.forward(&self, body.replay(), trace).await,
            (Err(Failed(answer)), None) => Err(answer),
        }
    }

    /// What the client asked, before any filter edits it.
    fn asked(&self, parts: &axum::http::request::Parts) -> Asked<'_> {
        let reads = self.plan.reads_asked;
        Asked {
            host: reads
                .then(|| crate::routes::request_host(&parts.headers, &parts.uri))
                .filter(|host| !host.is_empty())
                .map(str::to_owned),
            path: if reads {
                parts.uri.path().to_owned()
            } else {
                String::new()
            },
            variables: if self.plan.templated {
                self.route.template_variables(
                    parts.uri.path(),
                    crate::routes::request_host(&parts.headers, &parts.uri),
                )
            } else {
                Vec::new()
            },
        }
    }

    /// The request as the client sent it, for a route whose breaker has a
    /// `fallbackUri`; not for a request a fallback forwarded, whose own fallback is
    /// not followed.
    fn fallback(&self, parts: &axum::http::request::Parts) -> Option<Fallback> {
        let path = self.plan.fallback()?;
        if parts.extensions.get::<Forwarded>().is_some() {
            return None;
        }
        Some(Fallback {
            uri: match parts.uri.query() {
                Some(query) => format!("{path}?{query}"),
                None => path.to_owned(),
            },
            method: parts.method.clone(),
            headers: parts.headers.clone(),
        })
    }

    /// A valid bearer token (401), and one of the route's roles (403).
    async fn authenticate(
        &self,
        parts: &axum::http::request::Parts,
        trace: &mut Trace,
    ) -> Result<Arc<Claims>, Rejection> {
        let claims = self
            .gateway
            .verifier
            .verify_request_shared(parts)
            .await
            .map_err(|e| reject_auth(trace, e))?;
        let roles = &self.route.roles;
        if !roles.is_empty() && !roles.iter().any(|r| claims.has_role(r)) {
            trace.reason = Some("forbidden");
            return Err(Problem::forbidden(format!(
                "This route needs one of the roles: {}.",
                roles.join(", ")
            ))
            .into_response());
        }
        Ok(claims)
    }

    /// `RequestHeaderSize` (431) and `RedirectTo`.
    fn answer_without_upstream(
        &self,
        parts: &axum::http::request::Parts,
        trace: &mut Trace,
    ) -> Result<Option<Response>, Rejection> {
        if let Some(max) = self.plan.header_size {
            // Per header name, all its values together, as Spring counts: repeating a
            // header does not get round the limit.
            let too_large = parts.headers.keys().find(|name| {
                let values: usize = parts.headers.get_all(*name).iter().map(|v| v.len()).sum();
                name.as_str().len() + values > max
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
        Ok(self.plan.redirect.as_ref().map(|redirect| {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = redirect.status;
            response
                .headers_mut()
                .insert(header::LOCATION, redirect.location(parts.uri.query()));
            response
        }))
    }

    /// The route's `RequestRateLimiter`s (429). What the last one decided is told to
    /// the client in `RateLimit-*` headers.
    async fn limit(
        &self,
        parts: &axum::http::request::Parts,
        claims: &Claims,
        trace: &mut Trace,
    ) -> Result<Option<Quota>, Rejection> {
        let mut quota = None;
        for limiter in &self.plan.limiters {
            let key = match limiter.key {
                crate::limits::LimitKey::User => format!("user:{}", claims.sub),
                crate::limits::LimitKey::Ip => format!(
                    "ip:{}",
                    client_address(
                        self.client.ip(),
                        &parts.headers,
                        &self.gateway.trusted_proxies
                    )
                ),
            };
            let decision = match &self.gateway.shared_buckets {
                // Boxed: Redis's futures are large, and most routes have no limiter.
                Some(shared) => Box::pin(shared.check(limiter, &self.route.id, &key)).await,
                None => Some(limiter.check(&key, Instant::now())),
            };
            // Redis did not answer: let it through, unlimited and unlabelled.
            let Some(decision) = decision else {
                continue;
            };
            if !decision.allowed {
                metrics::counter!("gateway_rate_limited_total", "route" => self.route.id.clone())
                    .increment(1);
                trace.reason = Some("rate limited");
                return Err(limiter.refusal(&decision));
            }
            quota = Some((limiter.clone(), decision));
        }
        Ok(quota)
    }

    /// The body: refused when over the route's limit (413), buffered (and so
    /// replayable on another instance) when small or of unknown length under a
    /// limit, else streamed.
    async fn read_body(&self, headers: &HeaderMap, body: Body) -> Result<RequestBody, Rejection> {
        let limit = self.plan.body_limit;
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(len), Some(max)) = (declared, limit)
            && len > max
        {
            return Err(too_large(max));
        }
        // An HTTP/1.1 request without Content-Length or Transfer-Encoding has no body.
        if axum::body::HttpBody::is_end_stream(&body) {
            return Ok(RequestBody::Buffered(axum::body::Bytes::new()));
        }
        // Of unknown length (chunked, or HTTP/2 without Content-Length), a body is
        // read into memory only up to the route's limit; without one it streams.
        let bufferable = match (declared, limit) {
            (Some(len), _) => len <= MAX_REPLAY_BYTES,
            (None, Some(_)) => true,
            (None, None) => false,
        };
        if !bufferable {
            return Ok(RequestBody::Streamed(Some(body)));
        }
        let cap = limit.unwrap_or(MAX_REPLAY_BYTES).max(declared.unwrap_or(0)) as usize;
        let bytes = axum::body::to_bytes(body, cap)
            .await
            .map_err(|e| unreadable_body(&e, limit.unwrap_or(cap as u64)))?;
        Ok(RequestBody::Buffered(bytes))
    }

    /// The request as the upstream gets it: the route's path, query and header edits
    /// over the gateway's own headers (identity headers a client could forge dropped,
    /// `X-Forwarded-*` and `X-Request-Id` set), which the edits may read.
    fn edit_request(
        &self,
        parts: &mut axum::http::request::Parts,
        asked: &Asked<'_>,
        trace: &mut Trace,
    ) -> Result<Outgoing, Rejection> {
        // A WebSocket handshake: its `Upgrade` is a hop-by-hop header, dropped with
        // the others, so it is kept aside with the client's side of the connection.
        let upgrade = websocket_upgrade(&parts.headers).and_then(|value| {
            let connection = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
            Some(ClientUpgrade {
                value,
                connection,
                place: parts.extensions.remove::<shared::server::ConnectionPlace>(),
            })
        });
        let bad_path = || {
            trace.reason = Some("bad path");
            Problem::bad_request(
                "A path segment of `.` or `..`, or an encoded slash, cannot be placed into this route's path.",
            )
            .into_response()
        };
        // A route that edits neither sends the path and query as they came (an empty
        // query is none, as the edits make it).
        let unedited = (self.plan.path.is_empty() && self.plan.query.is_empty())
            .then(|| parts.uri.path_and_query())
            .flatten()
            .filter(|target| target.query().is_none_or(|q| !q.is_empty()));
        let target = match unedited {
            Some(target) => target.clone(),
            None => {
                let path = PathEdit::apply_all(&self.plan.path, parts.uri.path(), &asked.variables)
                    .ok_or_else(bad_path)?;
                let query =
                    QueryEdit::apply_all(&self.plan.query, parts.uri.query(), &asked.variables);
                match query {
                    Some(query) => PathAndQuery::try_from(format!("{path}?{query}")),
                    None => PathAndQuery::try_from(path),
                }
                .map_err(|_| {
                    Problem::bad_request("The request path cannot be forwarded.").into_response()
                })?
            }
        };
        let scheme = parts
            .extensions
            .get::<shared::server::Scheme>()
            .map_or("http", |s| s.0);
        let mut headers = std::mem::take(&mut parts.headers);
        let client_host = gateway_headers(&mut headers, self.client, self.request_id, scheme);
        HeaderEdit::apply_all(
            &self.plan.headers,
            &mut headers,
            &asked.variables,
            client_host.as_ref(),
        );
        Ok(Outgoing {
            idempotent: self.plan.retry.methods.contains(&parts.method)
                || headers.contains_key(&IDEMPOTENCY_KEY),
            method: parts.method.clone(),
            target,
            headers,
            timeout: self
                .route
                .response_timeout
                .unwrap_or_else(|| self.gateway.upstream.response_timeout()),
            upgrade,
        })
    }

    /// The route's breaker: a permit, or a 503 while it is open. It judges the
    /// upstream only: everything the client got wrong was refused above.
    fn admit(&self, trace: &mut Trace) -> Result<Option<crate::breaker::Permit>, Failed> {
        let Some(breaker) = &self.plan.breaker else {
            return Ok(None);
        };
        match breaker.permit(Instant::now()) {
            Ok(()) => Ok(Some(crate::breaker::Permit::new(breaker.clone()))),
            Err(open_for) => {
                trace.reason = Some("circuit open");
                let seconds = open_for.as_secs().max(1);
                let response = Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "Requests to this route are paused for {seconds}s after repeated upstream failures (circuit breaker {}).",
                        breaker.name
                    ),
                )
                .retry_after(seconds);
                Err(Failed(response))
            }
        }
    }

    /// The service the route sends to, as metrics and problems name it.
    fn service(&self) -> &str {
        match &self.route.upstream {
            Upstream::Fixed(_) => &self.route.id,
            Upstream::Service(service) => service,
        }
    }

    /// An instance not tried yet: the fixed upstream, or one the balancer picks.
    fn choose(&self, tried: &[String]) -> Option<Target> {
        let name = match &self.route.upstream {
            Upstream::Fixed(base) => {
                let (scheme, authority) = base.split_once("://").unwrap_or(("http", base));
                let health = self.gateway.balancer.health(base);
                let (authority, host) = health.reached(authority);
                return Some(Target {
                    scheme: if scheme == "https" { "https" } else { "http" },
                    authority,
                    others_left: true,
                    secure_address: None,
                    health,
                    host,
                });
            }
            Upstream::Service(name) => name,
        };
        let instances = self
            .gateway
            .discovery
            .as_ref()
            .map(|d| d.instances(name))
            .unwrap_or_default();
        let turn = self.route.turn.fetch_add(1, Ordering::Relaxed);
        let (instance, health) =
            self.gateway
                .balancer
                .pick(&instances, tried, self.route.balancing, turn, now_ms())?;
        // As the balancer would pick: `UP` and not tried yet. (One that registers
        // during the attempt is not waited for.)
        let others_left = instances.iter().any(|other| {
            other.is_up() && other.address != instance.address && !tried.contains(&other.address)
        });
        if let Some(port) = instance.secure_port {
            // An instance that registered a secure port is reached there over https,
            // by its registered name so that its certificate can be checked against
            // it; the name still leads to the address discovery checked (the
            // connector's pins).
            if let Ok(pinned) = instance.address.parse::<SocketAddr>() {
                self.gateway.pins.pin(&instance.host, pinned.ip());
            }
            let authority = if instance.host.contains(':') {
                format!("[{}]:{port}", instance.host)
            } else {
                format!("{}:{port}", instance.host)
            };
            return Some(Target {
                scheme: "https",
                authority: authority.parse().ok(),
                others_left,
                secure_address: Some(instance.address.clone()),
                health,
                host: None,
            });
        }
        // An instance registered by name is reached at the address its name was
        // checked and pinned to, and told its name in `Host`.
        let named_host = shared::networks::literal(&instance.host)
            .is_none()
            .then(|| HeaderValue::from_str(&format!("{}:{}", instance.host, instance.port)).ok())
            .flatten();
        let (authority, host) = health.reached(&instance.address);
        Some(Target {
            scheme: "http",
            authority,
            others_left,
            secure_address: None,
            host: named_host.or(host),
            health,
        })
    }

    /// Sends the request to an instance, and to others while the retry policy and the
    /// service's budget allow; the edited answer, or why there is none. The breaker's
    /// permit hears the outcome.
    async fn attempts(
        &self,
        mut outgoing: Outgoing,
        body: &mut RequestBody,
        permit: Option<crate::breaker::Permit>,
        asked: &Asked<'_>,
        quota: Option<&Quota>,
        trace: &mut Trace,
    ) -> Result<Response, Failed> {
        let outcome = self.try_instances(&mut outgoing, body, trace).await;
        let outcome = outcome.map(|answer| match answer {
            Answer::Upgraded(response) => response,
            Answer::Response(response) => {
                let mut response = finish(response, self.plan, asked);
                if let Some((limiter, decision)) = quota {
                    limiter.headers(decision, response.headers_mut());
                }
                response
            }
        });
        if let Some(permit) = permit {
            let failed = match &outcome {
                Ok(response) => permit.breaker().is_failure(response.status()),
                Err(_) => true,
            };
            if failed {
                permit.failed();
            } else {
                permit.succeeded();
            }
        }
        outcome
    }

    async fn try_instances(
        &self,
        outgoing: &mut Outgoing,
        body: &mut RequestBody,
        trace: &mut Trace,
    ) -> Result<Answer, Failed> {
        let service = self.service();
        let policy = &self.plan.retry;
        let budget = self.gateway.balancer.budget(service);
        budget.deposit(now_ms());
        // Read only for a policy with a timeout: no clock read on every request.
        let began = policy.timeout.is_some().then(Instant::now);
        let mut tried: Vec<String> = Vec::new();
        // The outcome of the last failed attempt, given when nothing is left to try:
        // an answer goes out as any answer does (its edits, its rate-limit headers,
        // the breaker judging its status), a failure to get one as a problem.
        let mut last: Option<Result<Answer, Failed>> = None;
        loop {
            let Some(target) = self.choose(&tried) else {
                trace.reason.get_or_insert("no instance");
                return last.unwrap_or_else(|| {
                    Err(Failed(
                        Problem::unavailable(service)
                            .with_detail(format!(
                                "No instance of {service} is available right now; retry later."
                            ))
                            .into_response(),
                    ))
                });
            };
            if let Some(outcome) = last.take() {
                // A retry, now that there is an instance to send it to: unless its
                // pause would end past the policy's timeout, it draws on the service's
                // budget, and waits that pause first.
                let elapsed = began.map_or(Duration::ZERO, |b| b.elapsed());
                let Some(pause) = policy.pause(tried.len(), elapsed, rand::random()) else {
                    trace.reason.get_or_insert("retry timeout");
                    return outcome;
                };
                if !budget.withdraw(now_ms()) {
                    return outcome;
                }
                metrics::counter!("gateway_retries_total", "route" => self.route.id.clone())
                    .increment(1);
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            // Whether another attempt may follow this one, should it fail in a
            // retryable way: the policy allows it, the body can be sent again, and an
            // instance is left to send it to. The last one takes the request's path
            // and headers; one that may be followed by another sends copies.
            let may_follow =
                tried.len() < policy.retries && body.replayable() && target.others_left;
            let (path, headers) = if !may_follow {
                (
                    std::mem::replace(&mut outgoing.target, PathAndQuery::from_static("/")),
                    std::mem::take(&mut outgoing.headers),
                )
            } else {
                (outgoing.target.clone(), outgoing.headers.clone())
            };
            let Some(attempt_body) = body.take() else {
                return Err(Failed(exhausted(service, tried.len())));
            };
            let sent = self
                .attempt(outgoing, path, headers, &target, attempt_body)
                .await;
            // The access log names the instance; the authority is not needed again
            // unless the attempt failed.
            let Target {
                authority,
                health,
                secure_address,
                ..
            } = target;
            trace.instance = authority;
            trace.retries = tried.len();

            // What went wrong, if anything, and whether another instance may be tried.
            let (failure, retryable) = match sent {
                Ok(response) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                    health.succeeded();
                    match outgoing.upgrade.take() {
                        // The upstream took the WebSocket: from here on the two
                        // connections are joined byte for byte, outside any timeout.
                        Some(client) => {
                            let idle = self.gateway.upstream.websocket_idle_timeout();
                            return Ok(Answer::Upgraded(join_upgrade(
                                response, client, service, idle,
                            )));
                        }
                        None => return Ok(Answer::Response(response)),
                    }
                }
                Ok(response) if policy.retries_status(response.status()) => {
                    if response.status().is_server_error() {
                        health.failed(now_ms());
                    }
                    (AttemptFailure::Status(response), outgoing.idempotent)
                }
                Ok(response) => {
                    if response.status().is_server_error() {
                        health.failed(now_ms());
                    } else {
                        health.succeeded();
                    }
                    return Ok(Answer::Response(response));
                }
                // Nothing the instance did: it is not charged, and nothing is retried
                // (the body is gone).
                Err(AttemptFailure::SlowClientBody(why)) => {
                    trace.reason = Some(SLOW_CLIENT_BODY);
                    return Err(Failed(slow_body_problem(&why)));
                }
                Err(failure) => {
                    health.failed(now_ms());
                    let retryable = match failure {
                        // The request never left: safe to send elsewhere, whatever the
                        // method.
                        AttemptFailure::Unreachable => policy.exceptions.contains(&FailureKind::Io),
                        AttemptFailure::Broken => {
                            outgoing.idempotent && policy.exceptions.contains(&FailureKind::Io)
                        }
                        AttemptFailure::Timeout => {
                            outgoing.idempotent && policy.exceptions.contains(&FailureKind::Timeout)
                        }
                        AttemptFailure::Status(_) | AttemptFailure::SlowClientBody(_) => false,
                    };
                    (failure, retryable)
                }
            };
            let shown = trace
                .instance
                .as_ref()
                .map(|a| a.as_str().to_owned())
                .unwrap_or_default();
            // Named as the balancer names instances, so that it picks another.
            tried.push(secure_address.unwrap_or_else(|| shown.clone()));
            let reason = failure.reason();
            trace.reason = Some(reason);
            metrics::counter!(
                "gateway_upstream_failures_total",
                "service" => service.to_owned(),
                "instance" => shown,
                "reason" => reason
            )
            .increment(1);
            let outcome = match failure {
                AttemptFailure::Status(response) => Ok(Answer::Response(response)),
                AttemptFailure::Unreachable | AttemptFailure::Broken => Err(Failed(
                    Problem::new(
                        StatusCode::BAD_GATEWAY,
                        format!("{service} could not be reached or broke the connection."),
                    )
                    .into_response(),
                )),
                AttemptFailure::Timeout => Err(Failed(
                    Problem::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "{service} did not answer within {}ms.",
                            outgoing.timeout.as_millis()
                        ),
                    )
                    .into_response(),
                )),
                AttemptFailure::SlowClientBody(why) => Err(Failed(slow_body_problem(&why))),
            };
            if !(retryable && may_follow) {
                return outcome;
            }
            last = Some(outcome);
        }
    }

    /// One attempt at `target`, inside a client span of its own (a retry on another
    /// instance is a span of its own, and the upstream's server span is its child),
    /// counted in flight at the instance for as long as it runs, however it ends.
    async fn attempt(
        &self,
        outgoing: &Outgoing,
        path: PathAndQuery,
        headers: HeaderMap,
        target: &Target,
        body: Body,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AttemptFailure> {
        use tracing::Instrument;
        let authority = target
            .authority
            .clone()
            .ok_or(AttemptFailure::Unreachable)?;
        let uri = Uri::builder()
            .scheme(target.scheme)
            .authority(authority)
            .path_and_query(path)
            .build()
            .map_err(|_| AttemptFailure::Unreachable)?;
        let mut attempt = axum::http::Request::new(body);
        *attempt.method_mut() = outgoing.method.clone();
        *attempt.uri_mut() = uri;
        *attempt.headers_mut() = headers;
        let headers = attempt.headers_mut();
        if let Some(upgrade) = &outgoing.upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade.value.clone());
        }
        if let Some(host) = &target.host
            && !headers.contains_key(header::HOST)
        {
            headers.insert(header::HOST, host.clone());
        }
        let service = self.service();
        // Only for the span exporter: without one, the upstream gets the request's
        // own trace context, and log lines already name the request's span.
        let span = if shared::telemetry::spans_recorded() {
            tracing::info_span!(
                "upstream",
                otel.name = %format_args!("{} {service}", outgoing.method),
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                peer.service = %service,
                server.address = target.shown(),
                http.response.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        if let Some(traceparent) =
            shared::telemetry::traceparent_of(&span).and_then(|v| HeaderValue::from_str(&v).ok())
        {
            headers.insert(TRACEPARENT.clone(), traceparent);
        }
        let sent = {
            let _in_flight = target.health.in_flight();
            tokio::time::timeout(outgoing.timeout, self.gateway.client().request(attempt))
                .instrument(span.clone())
                .await
        };
        match sent {
            Ok(Ok(response)) => {
                span.record("http.response.status_code", response.status().as_u16());
                if response.status().is_server_error() {
                    span.record("otel.status_code", "error");
                }
                Ok(response)
            }
            Ok(Err(e)) => {
                span.record("otel.status_code", "error");
                if e.is_connect() {
                    tracing::warn!(%service, instance = target.shown(), error = %e, "upstream unreachable");
                    Err(AttemptFailure::Unreachable)
                } else if let BodyFailure::TooSlow(why) = BodyFailure::of(&e) {
                    Err(AttemptFailure::SlowClientBody(why))
                } else {
                    tracing::warn!(%service, instance = target.shown(), error = %e, "upstream broke the exchange");
                    Err(AttemptFailure::Broken)
                }
            }
            Err(_) => {
                span.record("otel.status_code", "error");
                Err(AttemptFailure::Timeout)
            }
        }
    }
}

/// What a successful exchange produced.
enum Answer {
    Response(hyper::Response<hyper::body::Incoming>),
    /// A WebSocket handshake the upstream accepted; the connections are joined.
    Upgraded(Response),
}

/// The limiter that decided last, and its decision, for the `RateLimit-*` headers.
type Quota = (Arc<crate::limits::RateLimiter>, crate::limits::Decision);

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
    method: Method,
    headers: HeaderMap,
}

impl Fallback {
    /// Runs the request again through the routes, as if the client had asked the
    /// fallback's path: the route that matches it answers (a cached page, a default,
    /// a service that degrades gracefully). No route for it is a 503 naming it.
    async fn forward(
        self,
        from: &Exchange<'_>,
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
        let routes = from.gateway.routes.load_full();
        let facts = routes.facts_of(
            request.method(),
            request.uri(),
            request.headers(),
            Some(from.client.ip()),
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
        Box::pin(handle(
            from.gateway,
            route,
            from.client,
            from.request_id,
            request,
            trace,
        ))
        .await
    }
}

/// Why an attempt failed.
enum AttemptFailure {
    /// An answer the retry policy counts as a failure.
    Status(hyper::Response<hyper::body::Incoming>),
    Unreachable,
    Broken,
    Timeout,
    /// The client's body, streamed to the upstream, stalled or came too slowly (which
    /// of the two): the client's doing, not the instance's.
    SlowClientBody(String),
}

/// The access log's reason for [`AttemptFailure::SlowClientBody`].
const SLOW_CLIENT_BODY: &str = "request body too slow";

impl AttemptFailure {
    fn reason(&self) -> &'static str {
        match self {
            AttemptFailure::Status(_) => "upstream error status",
            AttemptFailure::Unreachable => "upstream unreachable",
            AttemptFailure::Broken => "upstream broke the exchange",
            AttemptFailure::Timeout => "upstream timeout",
            AttemptFailure::SlowClientBody(_) => SLOW_CLIENT_BODY,
        }
    }
}

/// The answer to a client whose streamed body stalled or trickled.
/// The answer to a client whose body stalled or trickled (`why` says which).
fn slow_body_problem(why: &str) -> Response {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        format!("The request body came too slowly: {why}; send it at once."),
    )
    .into_response()
}

/// Why a body could not be read, as the client is told: past the limit (413), too
/// slow (408), or broken off (400).
fn unreadable_body(error: &axum::Error, max: u64) -> Rejection {
    match BodyFailure::of(error) {
        BodyFailure::TooLarge => too_large(max),
        BodyFailure::TooSlow(why) => slow_body_problem(&why),
        BodyFailure::Other => {
            Problem::bad_request(format!("The request body could not be read: {error}."))
                .into_response()
        }
    }
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

/// The options of the request's `Connection` header(s), trimmed.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The `Upgrade` value of a WebSocket handshake (`Connection: upgrade` and
/// `Upgrade: websocket`), else `None`.
fn websocket_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let upgrade = headers.get(header::UPGRADE)?;
    let connection_upgrades =
        connection_tokens(headers).any(|token| token.eq_ignore_ascii_case("upgrade"));
    (connection_upgrades && upgrade.as_bytes().eq_ignore_ascii_case(b"websocket"))
        .then(|| upgrade.clone())
}

/// Answers the client `101` with the upstream's handshake headers, and joins the two
/// upgraded connections until either side closes, or until no byte has crossed in
/// either direction for `idle` (`None`: never). The client's connection keeps its
/// place under the server's connection cap until then.
fn join_upgrade(
    mut upstream: hyper::Response<hyper::body::Incoming>,
    client: ClientUpgrade,
    service: &str,
    idle: Option<Duration>,
) -> Response {
    let upstream_side = hyper::upgrade::on(&mut upstream);
    let service = service.to_owned();
    let ClientUpgrade {
        connection: client,
        place,
        ..
    } = client;
    tokio::spawn(async move {
        let _place = place;
        let (client, upstream) = match tokio::try_join!(client, upstream_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::warn!(%service, %error, "a WebSocket upgrade did not complete");
                return;
            }
        };
        let heard = Heard::default();
        let mut client = Heeded {
            io: hyper_util::rt::TokioIo::new(client),
            heard: &heard,
        };
        let mut upstream = Heeded {
            io: hyper_util::rt::TokioIo::new(upstream),
            heard: &heard,
        };
        metrics::gauge!("gateway_websockets_open", "service" => service.clone()).increment(1.0);
        let joined = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        let ended = match idle {
            Some(idle) => heard.until_idle(idle, joined).await,
            None => Some(joined.await),
        };
        match ended {
            Some(Ok(_)) => {}
            Some(Err(error)) => {
                tracing::debug!(%service, %error, "a WebSocket connection ended");
            }
            // Dropping both sides closes them: the client sees its connection end, as
            // behind a load balancer's idle timeout.
            None => tracing::info!(
                %service,
                idle_ms = idle.map_or(0, |d| d.as_millis()),
                "a WebSocket connection was idle too long and was closed"
            ),
        }
        metrics::gauge!("gateway_websockets_open", "service" => service).decrement(1.0);
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *response.headers_mut() = upstream.headers().clone();
    response
}

/// When a joined WebSocket last carried a byte, in either direction: milliseconds
/// since `since`. Both sides are polled by one task; an atomic keeps the joined
/// future `Send`.
struct Heard {
    since: Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Default for Heard {
    fn default() -> Self {
        Self {
            since: Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Heard {
    fn heard(&self) {
        let now = self.since.elapsed().as_millis() as u64;
        self.last_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.since + Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// `joined`'s outcome, or `None` once nothing was heard for `idle`. One timer,
    /// moved only when it fires: traffic costs a clock read per read, not a timer reset.
    async fn until_idle<F: std::future::Future>(
        &self,
        idle: Duration,
        joined: F,
    ) -> Option<F::Output> {
        tokio::pin!(joined);
        loop {
            let deadline = self.last() + idle;
            tokio::select! {
                ended = &mut joined => return Some(ended),
                () = tokio::time::sleep_until(deadline.into()) => {
                    if self.last() + idle <= Instant::now() {
                        return None;
                    }
                }
            }
        }
    }
}

/// One side of a joined WebSocket, noting in `heard` every read that brought bytes.
struct Heeded<'a, T> {
    io: T,
    heard: &'a Heard,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Heeded<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.heard();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Heeded<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The upstream's response as the client gets it: hop-by-hop and the upstream's CORS
/// headers dropped (the gateway owns CORS), then the route's response edits.
fn finish(
    upstream_response: hyper::Response<hyper::body::Incoming>,
    plan: &Plan,
    asked: &Asked<'_>,
) -> Response {
    let (mut parts, body) = upstream_response.into_parts();
    // Collecting nothing allocates nothing: the common case costs one scan.
    let dropped: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|k| HOP_BY_HOP.contains(k) || k.as_str().starts_with("access-control-"))
        .cloned()
        .collect();
    for name in dropped {
        parts.headers.remove(name);
    }
    // Room at once for the route's edits (`SecureHeaders` alone adds seven), the
    // request id, CORS and rate-limit headers: a map that grows rehashes every header.
    parts.headers.reserve(16);
    ResponseEdit::apply_all(&plan.response, &mut parts.status, &mut parts.headers, asked);
    Response::from_parts(parts, Body::new(body))
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
    remove_any(
        headers,
        &[
            X_FORWARDED_FOR.clone(),
            X_FORWARDED_PROTO.clone(),
            X_FORWARDED_HOST.clone(),
            header::FORWARDED,
        ],
    );
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

/// Removes each of `names` that `headers` has. One pass over the request's few
/// names, compared without hashing, instead of a hashed lookup per name: most requests
/// carry none of them.
fn remove_any(headers: &mut HeaderMap, names: &[HeaderName]) {
    if headers.keys().any(|k| names.contains(k)) {
        for name in names {
            headers.remove(name);
        }
    }
}

/// The headers the gateway itself sets for the upstream, before the route's edits:
/// hop-by-hop and forgeable identity headers dropped, `X-Forwarded-For`, `-Proto` and
/// `-Host` appended or set, `X-Request-Id` set. Returns the client's `Host`.
fn gateway_headers(
    headers: &mut HeaderMap,
    client: SocketAddr,
    request_id: &HeaderValue,
    scheme: &'static str,
) -> Option<HeaderValue> {
    // Headers the client's `Connection` names are this hop's too (RFC 9110 §7.6.1),
    // but not those the gateway answers for: a client cannot drop its host or the
    // trace this way.
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .filter(|name| *name != header::HOST && *name != TRACEPARENT && *name != X_REQUEST_ID)
        .collect();
    for name in named {
        headers.remove(name);
    }
    remove_any(headers, &HOP_BY_HOP);
    remove_any(headers, &FORGEABLE);
    // Room at once for what the gateway, the route and the client's `Host` add: a
    // header map that grows rehashes every header it holds, once per growth.
    headers.reserve(8);
    let original_host = headers.remove(header::HOST);
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(chain) => HeaderValue::from_str(&format!("{chain}, {}", client.ip())).ok(),
        None => {
            // Formatted in place: an address is at most 39 characters.
            use std::io::Write;
            let mut buffer = [0u8; 48];
            let mut cursor = std::io::Cursor::new(&mut buffer[..]);
            let written = write!(cursor, "{}", client.ip()).is_ok();
            let length = usize::try_from(cursor.position()).unwrap_or(0);
            written
                .then(|| HeaderValue::from_bytes(&buffer[..length]).ok())
                .flatten()
        }
    };
    if let Some(value) = forwarded_for {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
    // Appended, as Spring Cloud Gateway does, so that behind a load balancer that
    // ended TLS the service still learns the client spoke https (the first entry).
    let proto = forwarded_proto(headers.get(&X_FORWARDED_PROTO), scheme);
    headers.insert(X_FORWARDED_PROTO.clone(), proto);
    // Appended to a trusted proxy's, as Spring does (an untrusted one was dropped).
    if let Some(host) = &original_host {
        let appended = headers
            .get(&X_FORWARDED_HOST)
            .and_then(|chain| chain.to_str().ok().zip(host.to_str().ok()))
            .and_then(|(chain, host)| HeaderValue::from_str(&format!("{chain}, {host}")).ok());
        headers.insert(X_FORWARDED_HOST.clone(), appended.unwrap_or(host.clone()));
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    original_host
}

/// A random UUID (v4) for a request that came without an id.
fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut buffer = uuid::Uuid::encode_buffer();
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buffer))
        .expect("a UUID is a valid header value")
}

/// `00-<trace id>-<span id>-<01 or 00>`: a new W3C trace context, sampled or not, so
/// that services that export spans follow the gateway's sampling as their parent's.
fn new_traceparent(sampled: bool) -> (HeaderValue, TraceId) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-01";
    if !sampled {
        value[54] = b'0';
    }
    let random: [u8; 24] = rand::random();
    let (trace, span) = value.split_at_mut(35);
    let digits = trace[3..].iter_mut().chain(span[1..17].iter_mut());
    for (digit, nibble) in digits.zip(random.iter().flat_map(|b| [b >> 4, b & 0xf])) {
        *digit = HEX[usize::from(nibble)];
    }
    let mut trace = [0; 32];
    trace.copy_from_slice(&value[3..35]);
    (
        HeaderValue::from_bytes(&value).expect("hex digits are a valid header value"),
        TraceId(trace),
    )
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
    /// A joined WebSocket that carries no byte in either direction for this long is
    /// closed, as behind a load balancer's idle timeout, so that silent sockets cannot
    /// hold the connection cap's places for ever. Pings count as traffic. 0: never.
    pub websocket_idle_timeout_ms: u64,
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
            websocket_idle_timeout_ms: 300_000,
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

    /// How long a joined WebSocket may carry nothing, if it is ever closed for that.
    pub fn websocket_idle_timeout(&self) -> Option<Duration> {
        (self.websocket_idle_timeout_ms > 0)
            .then(|| Duration::from_millis(self.websocket_idle_timeout_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_answer_keeps_the_length_and_drops_the_body() {
        let problem = Problem::not_found("No route matches /x.").into_response();
        let length = axum::body::HttpBody::size_hint(problem.body())
            .exact()
            .expect("a problem has a known length");
        let head = without_body(problem);
        assert_eq!(
            head.headers()[header::CONTENT_LENGTH],
            length.to_string().as_str()
        );
        assert!(axum::body::HttpBody::is_end_stream(head.body()));
        assert_eq!(
            head.headers()[header::CONTENT_TYPE],
            shared::problem::CONTENT_TYPE
        );
    }

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
    fn connection_names_this_hops_headers_but_not_the_gateways() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop, traceparent, host"),
        );
        headers.insert("x-hop", HeaderValue::from_static("secret"));
        headers.insert(&TRACEPARENT, new_traceparent(true).0);
        headers.insert(header::HOST, HeaderValue::from_static("shop.example.org"));
        let client = SocketAddr::from(([127, 0, 0, 1], 5000));
        let id = new_request_id();
        let host = gateway_headers(&mut headers, client, &id, "http");
        assert!(!headers.contains_key("x-hop"));
        assert!(headers.contains_key(&TRACEPARENT), "{headers:?}");
        assert_eq!(
            host.as_ref().map(|h| h.as_bytes()),
            Some(&b"shop.example.org"[..])
        );
        assert_eq!(headers[&X_FORWARDED_HOST], "shop.example.org");
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
        let (first, trace) = new_traceparent(true);
        let text = first.to_str().unwrap();
        assert_eq!(
            shared::telemetry::trace_id(text),
            Some(trace.as_str()),
            "the trace id logged is the one sent"
        );
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
        assert_ne!(first, new_traceparent(true).0, "ids are random");
        assert!(new_traceparent(false).0.to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn a_new_request_id_is_a_random_uuid() {
        let id = new_request_id();
        let parsed = uuid::Uuid::parse_str(id.to_str().unwrap()).unwrap();
        assert_eq!(parsed.get_version(), Some(uuid::Version::Random));
        assert_ne!(id, new_request_id());
    }
}
