//! The gateway with real upstream servers on port 0 and the real registry.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Request, State},
    http::HeaderMap,
    routing::any,
};
use gateway::{Application, Settings, proxy::UpstreamSettings};
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::{
    config::HttpSettings,
    registry::{InstanceRegistration, RegistryClient},
};
use tokio_util::sync::CancellationToken;

mod support;

use support::{registry, registry_settings};

/// An upstream that answers every request with what it received.
#[derive(Clone)]
struct Upstream {
    name: String,
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    posts: Arc<AtomicUsize>,
    last_headers: Arc<Mutex<HashMap<String, String>>>,
    /// When not 0, every request is answered with this status.
    failing_with: Arc<AtomicU16>,
    /// A request whose path names `held` waits for this before it is answered.
    release: Arc<tokio::sync::Notify>,
}

async fn upstream(name: &str) -> Upstream {
    upstream_on("127.0.0.1", name).await
}

/// [`upstream`] on another loopback address (`127.0.0.2`...).
async fn upstream_on(ip: &str, name: &str) -> Upstream {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.expect("bind");
    let up = Upstream {
        name: name.to_owned(),
        addr: listener.local_addr().expect("addr"),
        hits: Arc::new(AtomicUsize::new(0)),
        posts: Arc::new(AtomicUsize::new(0)),
        last_headers: Arc::new(Mutex::new(HashMap::new())),
        failing_with: Arc::new(AtomicU16::new(0)),
        release: Arc::new(tokio::sync::Notify::new()),
    };
    async fn echo(
        State(up): State<Upstream>,
        headers: HeaderMap,
        mut request: Request,
    ) -> axum::response::Response {
        up.hits.fetch_add(1, Ordering::SeqCst);
        if request.uri().path().contains("read-body") {
            // As a service that takes an upload does: the whole body first.
            let (parts, body) = request.into_parts();
            if axum::body::to_bytes(body, usize::MAX).await.is_err() {
                return axum::http::StatusCode::BAD_REQUEST.into_response();
            }
            request = Request::from_parts(parts, axum::body::Body::empty());
        }
        let seen: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_owned()))
            .collect();
        *up.last_headers.lock().expect("lock") = seen;
        if request.method() == axum::http::Method::POST {
            up.posts.fetch_add(1, Ordering::SeqCst);
        }
        let failing = up.failing_with.load(Ordering::SeqCst);
        if failing != 0 {
            let status = axum::http::StatusCode::from_u16(failing)
                .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
            return (status, Json(json!({"upstream": up.name}))).into_response();
        }
        if request.uri().path().contains("slow") {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        if request.uri().path().contains("held") {
            up.release.notified().await;
        }
        if request.uri().path().contains("redirecting") {
            // A redirect naming the upstream's own address, as a service behind a
            // gateway often answers.
            let location = format!("http://{}/v1/landed", up.addr);
            return (
                axum::http::StatusCode::FOUND,
                [("location", location.as_str())],
            )
                .into_response();
        }
        let body = Json(json!({
            "upstream": up.name,
            "path": request.uri().path(),
            "query": request.uri().query(),
        }));
        (
            [
                ("access-control-allow-origin", "*"),
                ("x-upstream", "yes"),
                ("vary", "Accept-Encoding"),
            ],
            body,
        )
            .into_response()
    }
    use axum::response::IntoResponse;
    let app = Router::new().fallback(any(echo)).with_state(up.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    up
}

struct Stack {
    gateway: String,
    routes_file: std::path::PathBuf,
    registry: SocketAddr,
    client: reqwest::Client,
    _stop: Vec<CancellationToken>,
}

const ROUTES: &str = r#"
default-filters: [SecureHeaders]
routes:
  - id: stats
    uri: lb://order-service
    roles: [admin]
    order: -1
    predicates: ["Path=/orders/stats"]
  - id: orders
    uri: lb://order-service
    predicates: ["Path=/orders,/orders/**"]
    filters:
      - AddRequestHeader=X-Gateway, storefront
      - RemoveRequestHeader=Cookie
      - AddResponseHeader=X-Route, orders
  - id: legacy
    uri: lb://order-service
    predicates: ["Path=/legacy/**", "Method=GET"]
    filters: ["RewritePath=/legacy/(?<rest>.*), /v2/${rest}"]
  - id: api
    uri: lb://order-service
    predicates: ["Path=/api/**", "Header=X-Version, 2", "Query=debug"]
    filters: [StripPrefix=1]
  - id: uploads
    uri: lb://order-service
    predicates: ["Path=/uploads/**", "Host=**.shop.test"]
    filters: [{name: RequestSize, args: {maxSize: 1KB}}]
  - id: payments
    uri: lb://payment-service
    predicates: ["Path=/payments/**"]
  - id: guarded
    uri: lb://order-service
    predicates: ["Path=/guarded/**"]
    filters:
      - name: CircuitBreaker
        args: { name: orders-breaker, slidingWindowSize: 4, minimumNumberOfCalls: 4, failureRateThreshold: 50, waitDurationInOpenState: 300 }
  - id: limited
    uri: lb://order-service
    predicates: ["Path=/limited/**"]
    filters:
      - name: RequestRateLimiter
        args: { redis-rate-limiter.replenishRate: 1, redis-rate-limiter.burstCapacity: 2 }
"#;

async fn stack(routes: &str, response_timeout_ms: u64) -> Stack {
    stack_with(routes, response_timeout_ms, |_| {}).await
}

/// [`stack`] with the gateway's settings edited by `edit`.
async fn stack_with(
    routes: &str,
    response_timeout_ms: u64,
    edit: impl FnOnce(&mut Settings),
) -> Stack {
    let (registry, stop_registry) = registry().await;
    let dir = tempfile::tempdir().expect("dir");
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes).expect("routes");
    let settings = Settings {
        upstream: UpstreamSettings {
            response_timeout_ms,
            ..UpstreamSettings::default()
        },
        cors: gateway::limits::CorsSettings {
            allowed_origins: vec!["https://shop.example.test".into()],
            ..gateway::limits::CorsSettings::default()
        },
        ..support::gateway_settings(registry, &routes_file)
    };
    let mut settings = settings;
    edit(&mut settings);
    let app = Application::build(settings).await.expect("gateway");
    let gateway = format!("http://{}", app.local_addr());
    let stop_gateway = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop_gateway.clone()));
    // The routes file must outlive start-up only; keep the folder for the test anyway.
    std::mem::forget(dir);
    Stack {
        gateway,
        routes_file,
        registry,
        client: reqwest::Client::new(),
        _stop: vec![stop_gateway, stop_registry],
    }
}

impl Stack {
    async fn token(&self, user: &str, password: &str) -> String {
        let response = self
            .client
            .post(format!("{}/auth/token", self.gateway))
            .json(&json!({"username": user, "password": password}))
            .send()
            .await
            .expect("login");
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["token_type"], "Bearer");
        assert!(body["expires_in"].as_u64() > Some(0));
        body["access_token"].as_str().expect("token").to_owned()
    }

    /// Registers `upstream` as an instance of `service` and waits until the gateway
    /// routes to it.
    async fn register(&self, service: &str, up: &Upstream) -> InstanceRegistration {
        let settings = registry_settings(self.registry);
        let registration = InstanceRegistration::for_bound(service, up.addr, &settings);
        RegistryClient::new(&settings)
            .expect("registry client")
            .register(&registration, 60)
            .await
            .expect("register");
        registration
    }

    async fn get_with(
        &self,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .get(format!("{}{path}", self.gateway))
            .bearer_auth(token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request")
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.gateway))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    /// Route `id` as the routes report shows it now (null when it is not there).
    async fn route_report(&self, id: &str, admin: &str) -> Value {
        let report: Value = self
            .get("/actuator/gateway/routes", admin)
            .await
            .json()
            .await
            .expect("json");
        report
            .as_array()
            .and_then(|r| r.iter().find(|r| r["route_id"] == id))
            .cloned()
            .unwrap_or_default()
    }

    /// Retries `path` until it stops answering 503 (the discovery cache caught up).
    async fn get_routed(&self, path: &str, token: &str) -> reqwest::Response {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let response = self.get(path, token).await;
            if response.status() != StatusCode::SERVICE_UNAVAILABLE {
                return response;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never routed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test]
async fn the_built_in_routes_refuse_admin_endpoints_to_customers_at_the_gateway() {
    let s = stack(include_str!("../config/routes.yaml"), 2000).await;
    let orders = upstream("order-service").await;
    let payments = upstream("payment-service").await;
    s.register("order-service", &orders).await;
    s.register("payment-service", &payments).await;
    let customer = s.token("alice", "alice-pw").await;
    let admin = s.token("admin", "admin-pw").await;
    assert_eq!(s.get_routed("/orders", &customer).await.status(), 200);
    assert_eq!(
        s.get_routed("/payments/accounts/me", &customer)
            .await
            .status(),
        200
    );
    let before = (
        orders.hits.load(Ordering::SeqCst),
        payments.hits.load(Ordering::SeqCst),
    );
    for path in [
        "/orders/stats",
        "/payments/accounts/bob",
        "/payments/accounts/bob/deposits",
    ] {
        let refused = s.get(path, &customer).await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(
            refused.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(
        (
            orders.hits.load(Ordering::SeqCst),
            payments.hits.load(Ordering::SeqCst)
        ),
        before,
        "a refused request reached a service"
    );
    // Admins get through, and a customer's own account stays open.
    for (path, token) in [
        ("/orders/stats", &admin),
        ("/payments/accounts/bob", &admin),
        ("/payments/accounts/me/deposits", &customer),
        ("/orders/some-order", &customer),
    ] {
        assert_eq!(s.get(path, token).await.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_stopping_gateway_finishes_what_its_workers_have_in_flight() {
    let s = stack(ROUTES, 10_000).await;
    let up = upstream("order-service").await;
    s.register("order-service", &up).await;
    let token = s.token("alice", "alice-pw").await;
    assert_eq!(s.get_routed("/orders/1", &token).await.status(), 200);
    let before = up.hits.load(Ordering::SeqCst);

    // Slow requests, each on its own connection, so the kernel spreads them over the
    // workers' listeners.
    let mut in_flight = tokio::task::JoinSet::new();
    for i in 0..6 {
        let url = format!("{}/orders/slow-{i}", s.gateway);
        let token = token.clone();
        in_flight.spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .map(|r| r.status())
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while up.hits.load(Ordering::SeqCst) < before + 6 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow requests never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s._stop[0].cancel();

    while let Some(done) = in_flight.join_next().await {
        let status = done
            .expect("task")
            .expect("an in-flight request was cut off");
        assert_eq!(status, 200, "finished despite the stop");
    }
    // Stopped: new connections are no longer accepted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let refused = reqwest::Client::new()
            .get(format!("{}/actuator/health", s.gateway))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_err();
        if refused {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway kept accepting after it stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tokens_are_issued_published_and_refused_for_wrong_credentials() {
    let s = stack(ROUTES, 2000).await;
    let wrong = s
        .client
        .post(format!("{}/auth/token", s.gateway))
        .json(&json!({"username": "alice", "password": "nope"}))
        .send()
        .await
        .expect("login");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.headers()["content-type"], "application/problem+json");
    let unknown = s
        .client
        .post(format!("{}/auth/token", s.gateway))
        .json(&json!({"username": "mallory", "password": "x"}))
        .send()
        .await
        .expect("login");
    assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);

    let token = s.token("alice", "alice-pw").await;
    let jwks: Value = s
        .client
        .get(format!("{}/.well-known/jwks.json", s.gateway))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    assert_eq!(jwks["keys"][0]["alg"], "EdDSA");
    let header: Value =
        serde_json::from_slice(&base64_url(token.split('.').next().expect("header")))
            .expect("header json");
    assert_eq!(
        header["kid"], jwks["keys"][0]["kid"],
        "the token names the published key"
    );
    let payload: Value =
        serde_json::from_slice(&base64_url(token.split('.').nth(1).expect("payload")))
            .expect("json");
    assert_eq!(payload["sub"], "user-alice");
    assert_eq!(payload["roles"], json!(["customer"]));
    for claim in ["iss", "aud", "iat", "exp"] {
        assert!(payload.get(claim).is_some(), "{claim}");
    }
}

fn base64_url(part: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .expect("base64url")
}

#[tokio::test]
async fn requests_without_a_valid_token_never_reach_a_service() {
    let s = stack(ROUTES, 2000).await;
    let up = upstream("orders-1").await;
    s.register("order-service", &up).await;
    let token = s.token("alice", "alice-pw").await;
    s.get_routed("/orders", &token).await;
    let before = up.hits.load(Ordering::SeqCst);

    let missing = s
        .client
        .get(format!("{}/orders", s.gateway))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let garbage = s.get("/orders", "not-a-token").await;
    assert_eq!(garbage.status(), StatusCode::UNAUTHORIZED);
    let stats = s.get("/orders/stats", &token).await;
    assert_eq!(
        stats.status(),
        StatusCode::FORBIDDEN,
        "customers lack the admin role"
    );
    let routes = s.get("/actuator/gateway/routes", &token).await;
    assert_eq!(routes.status(), StatusCode::FORBIDDEN);
    let prometheus = s
        .client
        .get(format!("{}/actuator/prometheus", s.gateway))
        .send()
        .await
        .expect("request");
    assert_eq!(prometheus.status(), StatusCode::UNAUTHORIZED);
    let health = s
        .client
        .get(format!("{}/actuator/health", s.gateway))
        .send()
        .await
        .expect("request");
    assert_eq!(health.status(), StatusCode::OK, "health stays open");
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        before,
        "nothing reached the service"
    );

    let admin = s.token("admin", "admin-pw").await;
    assert_eq!(
        s.get("/orders/stats", &admin).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn predicates_and_filters_shape_what_the_service_sees() {
    let s = stack(ROUTES, 2000).await;
    let up = upstream("orders-1").await;
    s.register("order-service", &up).await;
    let token = s.token("alice", "alice-pw").await;

    s.get_routed("/orders", &token).await;
    let response = s
        .get_with(
            "/orders/42?x=1",
            &token,
            &[
                ("cookie", "session=secret"),
                ("x-user-id", "forged-admin"),
                ("x-request-id", "req-123"),
                // Forged: no trusted proxy is configured in front of this gateway.
                ("x-forwarded-proto", "https"),
                ("x-forwarded-for", "10.9.9.9"),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-route"], "orders", "AddResponseHeader");
    assert_eq!(
        response.headers()["x-content-type-options"],
        "nosniff",
        "SecureHeaders"
    );
    assert_eq!(response.headers()["x-request-id"], "req-123", "passed on");
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "upstream CORS headers dropped"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(
        (body["path"].as_str(), body["query"].as_str()),
        (Some("/orders/42"), Some("x=1"))
    );
    let seen = up.last_headers.lock().expect("lock").clone();
    assert_eq!(
        seen.get("x-gateway").map(String::as_str),
        Some("storefront")
    );
    assert!(!seen.contains_key("cookie"), "RemoveRequestHeader");
    assert!(!seen.contains_key("x-user-id"), "forged identity dropped");
    assert_eq!(
        seen.get("authorization"),
        Some(&format!("Bearer {token}")),
        "token relayed"
    );
    assert_eq!(
        seen.get("x-request-id").map(String::as_str),
        Some("req-123")
    );
    assert!(
        seen.get("traceparent")
            .is_some_and(|t| t.starts_with("00-") && t.len() == 55),
        "a trace is started: {seen:?}"
    );
    assert_eq!(
        seen.get("x-forwarded-for").map(String::as_str),
        Some("127.0.0.1")
    );
    assert_eq!(
        seen.get("x-forwarded-proto").map(String::as_str),
        Some("http"),
        "a client's own X-Forwarded-Proto is not believed at the edge"
    );

    let rewritten: Value = s
        .get("/legacy/items/7", &token)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(rewritten["path"], "/v2/items/7", "RewritePath");
    assert_eq!(
        s.client
            .post(format!("{}/legacy/items/7", s.gateway))
            .bearer_auth(&token)
            .send()
            .await
            .expect("post")
            .status(),
        StatusCode::NOT_FOUND,
        "Method=GET: no route for POST"
    );

    let api: Value = s
        .get_with("/api/things?debug=1", &token, &[("x-version", "2")])
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(api["path"], "/things", "StripPrefix=1");
    let wrong_version = s
        .get_with("/api/things?debug=1", &token, &[("x-version", "1")])
        .await;
    assert_eq!(
        wrong_version.status(),
        StatusCode::NOT_FOUND,
        "Header predicate"
    );
    let no_query = s
        .get_with("/api/things", &token, &[("x-version", "2")])
        .await;
    assert_eq!(no_query.status(), StatusCode::NOT_FOUND, "Query predicate");

    let upload = |host: &'static str, size: usize| {
        s.client
            .post(format!("{}/uploads/file", s.gateway))
            .bearer_auth(&token)
            .header("host", host)
            .body(vec![b'x'; size])
            .send()
    };
    assert_eq!(
        upload("eu.shop.test", 100).await.expect("upload").status(),
        StatusCode::OK
    );
    let big = upload("eu.shop.test", 4096).await.expect("upload");
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(big.headers()["content-type"], "application/problem+json");
    assert_eq!(
        upload("example.org", 100).await.expect("upload").status(),
        StatusCode::NOT_FOUND,
        "Host predicate"
    );
}

/// Posts ten bytes of a body declared `length` long to `path` on `address`, then
/// nothing; what the gateway answers, within ten seconds.
async fn stall_upload(address: &str, path: &str, host: &str, token: &str, length: u64) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
                 Content-Length: {length}\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .await
        .expect("send");
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer once the body stalls")
        .expect("read");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// A body that stalls before its declared length is a body that came too slowly
/// (408): not one over the route's limit (413), which would send the client off
/// shrinking an upload that was small, and, streamed to an instance, not the
/// instance's failure (502), which would count against it.
#[tokio::test]
async fn a_stalled_upload_is_told_it_came_too_slowly_not_that_it_is_too_large() {
    let s = stack_with(ROUTES, 2000, |settings| {
        settings.http.limits.body_read_timeout_ms = 300;
    })
    .await;
    let orders = upstream("orders-a").await;
    s.register("order-service", &orders).await;
    let token = s.token("alice", "alice-pw").await;
    let address = s.gateway.trim_start_matches("http://").to_owned();
    shared::testing::eventually(
        Duration::from_secs(10),
        "the gateway routes uploads",
        async || {
            let response = s
                .client
                .post(format!("{}/uploads/file", s.gateway))
                .bearer_auth(&token)
                .header("host", "eu.shop.test")
                .body("x")
                .send()
                .await
                .ok()?;
            (response.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
    // Ten bytes of a hundred, then nothing.
    let answer = stall_upload(&address, "/uploads/file", "eu.shop.test", &token, 100).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("too slowly"), "{answer}");

    // A large body, streamed to the instance as it comes, that stalls: the same 408,
    // not the 502 of an instance that broke the exchange (which counts against it).
    let answer = stall_upload(&address, "/orders/read-body", "gateway", &token, 1_000_000).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn load_spreads_over_instances_and_a_removed_instance_gets_nothing_more() {
    let s = stack(ROUTES, 2000).await;
    let (a, b) = (upstream("orders-a").await, upstream("orders-b").await);
    let reg_a = s.register("order-service", &a).await;
    s.register("order-service", &b).await;
    let token = s.token("alice", "alice-pw").await;
    // Wait until both are known to the gateway.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.hits.load(Ordering::SeqCst) == 0 || b.hits.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both instances get traffic"
        );
        s.get_routed("/orders", &token).await;
    }
    let (a0, b0) = (a.hits.load(Ordering::SeqCst), b.hits.load(Ordering::SeqCst));
    for _ in 0..20 {
        assert_eq!(s.get("/orders", &token).await.status(), StatusCode::OK);
    }
    let (da, db) = (
        a.hits.load(Ordering::SeqCst) - a0,
        b.hits.load(Ordering::SeqCst) - b0,
    );
    assert_eq!(da + db, 20);
    assert_eq!((da, db), (10, 10), "round robin alternates");

    RegistryClient::new(&registry_settings(s.registry))
        .expect("registry client")
        .deregister("order-service", &reg_a.instance_id)
        .await
        .expect("deregister");
    // Once the gateway has seen the removal, a receives nothing more.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let orders = s
            .route_report("orders", &s.token("admin", "admin-pw").await)
            .await;
        if orders["instances"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "removal reaches the gateway"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = a.hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(s.get("/orders", &token).await.status(), StatusCode::OK);
    }
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        after,
        "no request after removal"
    );
}

#[tokio::test]
async fn upstream_failures_are_503_502_and_504_problems_naming_the_service() {
    let s = stack(ROUTES, 300).await;
    let token = s.token("alice", "alice-pw").await;

    let none = s.get("/payments/accounts/me", &token).await;
    assert_eq!(none.status(), StatusCode::SERVICE_UNAVAILABLE);
    let problem: Value = none.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("payment-service")
    );

    // Registered, but nothing listens there.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let settings = registry_settings(s.registry);
    RegistryClient::new(&settings)
        .expect("registry client")
        .register(
            &InstanceRegistration::for_bound("payment-service", dead, &settings),
            60,
        )
        .await
        .expect("register");
    let unreachable = s.get_routed("/payments/accounts/me", &token).await;
    assert_eq!(unreachable.status(), StatusCode::BAD_GATEWAY);
    let problem: Value = unreachable.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("payment-service")
    );

    let slow = upstream("orders-slow").await;
    s.register("order-service", &slow).await;
    let timed_out = s.get_routed("/orders/slow", &token).await;
    assert_eq!(timed_out.status(), StatusCode::GATEWAY_TIMEOUT);
    let problem: Value = timed_out.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("order-service")
    );
}

#[tokio::test]
async fn the_routes_report_shows_live_instances_to_admins() {
    let s = stack(ROUTES, 2000).await;
    let up = upstream("orders-1").await;
    s.register("order-service", &up).await;
    let admin = s.token("admin", "admin-pw").await;
    s.get_routed("/orders", &admin).await;
    // Spring Cloud Gateway's shape: a list of {route_id, predicate, filters, uri, order}.
    let orders = s.route_report("orders", &admin).await;
    assert_eq!(orders["uri"], "lb://order-service");
    assert_eq!(orders["order"], 0);
    assert_eq!(orders["predicate"], "Path=/orders, /orders/**");
    assert_eq!(
        orders["filters"],
        json!([
            "SecureHeaders",
            "AddRequestHeader=X-Gateway, storefront",
            "RemoveRequestHeader=Cookie",
            "AddResponseHeader=X-Route, orders"
        ])
    );
    assert_eq!(orders["instances"][0]["address"], up.addr.to_string());
    assert_eq!(orders["instances"][0]["receivesTraffic"], true);
    // And one route by its id, as SCG's /actuator/gateway/routes/{id}.
    let one: Value = s
        .get("/actuator/gateway/routes/orders", &admin)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(one["route_id"], "orders");
    assert_eq!(one["predicate"], orders["predicate"]);
    let missing = s.get("/actuator/gateway/routes/nope", &admin).await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let customer = s.token("alice", "alice-pw").await;
    let refused = s.get("/actuator/gateway/routes/orders", &customer).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn probes_answer_without_a_token_and_only_admins_change_log_levels() {
    // The process's subscriber, as main installs it (quiet: other tests share it).
    let _telemetry = shared::telemetry::init(
        "gateway",
        &shared::telemetry::LogSettings {
            level: "error".into(),
            ..Default::default()
        },
        &Default::default(),
    )
    .expect("telemetry");
    let s = stack(ROUTES, 2000).await;
    for probe in ["/actuator/health/liveness", "/actuator/health/readiness"] {
        let response = s
            .client
            .get(format!("{}{probe}", s.gateway))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "{probe}");
    }
    let index = s
        .client
        .get(format!("{}/actuator", s.gateway))
        .send()
        .await
        .expect("request");
    assert_eq!(
        index.status(),
        StatusCode::UNAUTHORIZED,
        "the rest needs a token"
    );

    let level = |token: String| {
        s.client
            .post(format!("{}/actuator/loggers/gateway::proxy", s.gateway))
            .bearer_auth(token)
            .json(&json!({"configuredLevel": "DEBUG"}))
            .send()
    };
    let customer = level(s.token("alice", "alice-pw").await)
        .await
        .expect("request");
    assert_eq!(customer.status(), StatusCode::FORBIDDEN);
    let admin = s.token("admin", "admin-pw").await;
    let changed = level(admin.clone()).await.expect("request");
    assert_eq!(changed.status(), StatusCode::NO_CONTENT);
    let now: Value = s
        .get("/actuator/loggers/gateway::proxy", &admin)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(now["configuredLevel"], "DEBUG");
}

#[tokio::test]
async fn routed_requests_are_timed_as_spring_cloud_gateway_names_them() {
    let s = stack(ROUTES, 2000).await;
    let up = upstream("orders-1").await;
    s.register("order-service", &up).await;
    let token = s.token("alice", "alice-pw").await;
    s.get_routed("/orders", &token).await;
    let admin = s.token("admin", "admin-pw").await;
    let text = s
        .get("/actuator/prometheus", &admin)
        .await
        .text()
        .await
        .expect("text");
    let timer = text.lines().find(|l| {
        l.starts_with("spring_cloud_gateway_requests_seconds_bucket{")
            && l.contains(r#"routeId="orders""#)
            && l.contains(r#"routeUri="lb://order-service""#)
            && l.contains(r#"httpMethod="GET""#)
            && l.contains(r#"httpStatusCode="200""#)
            && l.contains(r#"status="OK""#)
            && l.contains(r#"outcome="SUCCESSFUL""#)
    });
    assert!(timer.is_some(), "{text}");
}

const EDIT_ROUTES: &str = r#"
routes:
  - id: edits
    uri: lb://order-service
    predicates: ["Path=/edit/{segment}"]
    filters:
      - SetPath=/v3/{segment}
      - PrefixPath=/api
      - SetRequestHeader=X-Mode, set
      - AddRequestHeadersIfNotPresent=X-Colour:blue,X-Mode:ignored
      - MapRequestHeader=X-Tenant, X-Tenant-Copy
      - AddRequestParameter=source, gate way
      - RemoveRequestParameter=debug
      - SetResponseHeader=X-Upstream, replaced
      - RemoveResponseHeader=Vary
      - SetStatus=202
      - AddRequestHeader=X-Segment, seg-{segment}
      - AddResponseHeader=X-Segment, {segment}
  - id: preserved
    uri: lb://order-service
    predicates: ["Path=/host/**"]
    filters: [PreserveHostHeader]
  - id: named-host
    uri: lb://order-service
    predicates: ["Path=/sethost/**"]
    filters: ["SetRequestHostHeader=internal.example.org"]
  - id: moved
    uri: lb://order-service
    predicates: ["Path=/old/**"]
    filters: ["RedirectTo=302, https://shop.example.org/new"]
  - id: small-headers
    uri: lb://order-service
    predicates: ["Path=/tiny/**"]
    filters: ["RequestHeaderSize=1000B"]
  - id: responses
    uri: lb://order-service
    predicates: ["Path=/rw/**"]
    filters:
      - RewriteResponseHeader=X-Upstream, y(es), n$1
      # Response filters edit the response last first, as in Spring: the dedupe
      # written first runs after the three additions.
      - DedupeResponseHeader=X-Dup, RETAIN_UNIQUE
      - AddResponseHeader=X-Dup, a
      - AddResponseHeader=X-Dup, a
      - AddResponseHeader=X-Dup, b
  - id: relocated
    uri: lb://order-service
    predicates: ["Path=/loc/**"]
    filters: [RewriteLocationResponseHeader]
"#;

#[tokio::test]
async fn spring_cloud_gateway_filters_edit_requests_and_responses_as_spring_does() {
    let s = stack(EDIT_ROUTES, 2000).await;
    let up = upstream("orders-1").await;
    s.register("order-service", &up).await;
    let token = s.token("alice", "alice-pw").await;
    s.get_routed("/rw/x", &token).await;

    let response = s
        .get_with(
            "/edit/books?debug=1&page=2&%64ebug=2",
            &token,
            &[("x-mode", "client"), ("x-tenant", "t-1")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED, "SetStatus");
    assert_eq!(
        response.headers()["x-upstream"],
        "replaced",
        "SetResponseHeader"
    );
    assert!(
        response.headers().get("vary").is_none(),
        "RemoveResponseHeader"
    );
    assert_eq!(
        response.headers()["x-segment"],
        "books",
        "a path variable in a response header's value"
    );
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["path"], "/api/v3/books", "SetPath then PrefixPath");
    assert_eq!(body["query"], "page=2&source=gate%20way", "parameters");
    let seen = up.last_headers.lock().expect("lock").clone();
    assert_eq!(seen.get("x-mode").map(String::as_str), Some("set"));
    assert_eq!(seen.get("x-colour").map(String::as_str), Some("blue"));
    assert_eq!(seen.get("x-tenant-copy").map(String::as_str), Some("t-1"));
    assert_eq!(
        seen.get("x-segment").map(String::as_str),
        Some("seg-books"),
        "a path variable in a request header's value"
    );
    // A variable that would break the header (CR LF) is put in as it was matched.
    let crafted = s.get_with("/edit/a%0D%0AX-Evil:1", &token, &[]).await;
    assert_eq!(crafted.headers()["x-segment"], "a%0D%0AX-Evil:1");
    let seen = up.last_headers.lock().expect("lock").clone();
    assert_eq!(
        seen.get("x-segment").map(String::as_str),
        Some("seg-a%0D%0AX-Evil:1")
    );
    assert!(!seen.contains_key("x-evil"));

    s.get_with("/host/a", &token, &[]).await;
    let gateway_host = s.gateway.trim_start_matches("http://").to_owned();
    let host = up.last_headers.lock().expect("lock").get("host").cloned();
    assert_eq!(host, Some(gateway_host), "PreserveHostHeader");
    s.get_with("/sethost/a", &token, &[]).await;
    let host = up.last_headers.lock().expect("lock").get("host").cloned();
    assert_eq!(host.as_deref(), Some("internal.example.org"));

    let hits = up.hits.load(Ordering::SeqCst);
    let moved = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("{}/old/page", s.gateway))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(moved.status(), StatusCode::FOUND);
    assert_eq!(moved.headers()["location"], "https://shop.example.org/new");
    let big = "x".repeat(2000);
    let refused = s.get_with("/tiny/a", &token, &[("x-big", &big)]).await;
    assert_eq!(
        refused.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    // Repeating a header does not get round the limit.
    let half = "x".repeat(600);
    let repeated = s
        .get_with("/tiny/a", &token, &[("x-big", &half), ("x-big", &half)])
        .await;
    assert_eq!(
        repeated.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    // A variable cannot climb out of SetPath's template.
    let climbing = s.get_with("/edit/..%2fadmin", &token, &[]).await;
    assert_eq!(climbing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "neither reached the upstream"
    );

    let rewritten = s.get_with("/rw/x", &token, &[]).await;
    assert_eq!(
        rewritten.headers()["x-upstream"],
        "nes",
        "RewriteResponseHeader"
    );
    let dup: Vec<_> = rewritten.headers().get_all("x-dup").iter().collect();
    assert_eq!(dup, ["b", "a"], "DedupeResponseHeader keeps whole values");

    // The upstream's redirect names the gateway, not the upstream, and drops the
    // version the client did not ask with.
    let relocated = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("{}/loc/redirecting", s.gateway))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(relocated.status(), StatusCode::FOUND);
    assert_eq!(
        relocated.headers()["location"],
        format!("{}/landed", s.gateway).as_str(),
        "RewriteLocationResponseHeader"
    );
}

#[tokio::test]
async fn a_bad_route_file_is_refused_at_start_up_naming_route_and_field() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("routes.yaml");
    std::fs::write(
        &file,
        "routes: [{id: broken, uri: 'ftp://x', predicates: [Path=/x]}]",
    )
    .expect("write");
    let settings = Settings {
        http: HttpSettings::local(0),
        routes_file: Some(file),
        ..Settings::default()
    };
    let err = Application::build(settings)
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("broken") && err.contains("uri"), "{err}");
}

#[tokio::test]
async fn instances_outside_the_allowed_networks_get_no_traffic() {
    // Only 127.0.0.1 (and ::1) are this gateway's instance networks.
    let s = stack_with(ROUTES, 2000, |settings| {
        settings.upstream.instance_networks = vec!["127.0.0.1/32".into(), "::1/128".into()];
    })
    .await;
    let good = upstream("orders-good").await;
    // A live server outside the networks: were the check missing, it would get traffic
    // (and the users' bearer tokens).
    let elsewhere = upstream_on("127.0.0.2", "orders-elsewhere").await;
    let settings = registry_settings(s.registry);
    let registry = RegistryClient::new(&settings).expect("registry client");
    let mut outside = InstanceRegistration::for_bound("order-service", elsewhere.addr, &settings);
    outside.instance_id = "outside".into();
    registry.register(&outside, 60).await.expect("register");
    // A registration by host name, admitted once it resolves into the networks.
    let mut named = InstanceRegistration::for_bound("order-service", good.addr, &settings);
    named.instance_id = "named".into();
    named.host = "localhost".into();
    registry.register(&named, 60).await.expect("register");

    let admin = s.token("admin", "admin-pw").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let orders = loop {
        let orders = s.route_report("orders", &admin).await;
        let seen = |key: &str| orders[key].as_array().map_or(0, Vec::len);
        if seen("instances") + seen("refusedInstances") == 2 {
            break orders;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never saw both instances: {orders}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(orders["instances"][0]["instanceId"], "named", "{orders}");
    assert_eq!(orders["instances"].as_array().map(Vec::len), Some(1));
    let refused = &orders["refusedInstances"][0];
    assert_eq!(refused["instanceId"], "outside", "{orders}");
    let reason = refused["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("127.0.0.2 is outside"), "{reason}");

    let token = s.token("alice", "alice-pw").await;
    for _ in 0..6 {
        let response = s.get("/orders", &token).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    assert_eq!(
        good.hits.load(Ordering::SeqCst),
        6,
        "every request went to it"
    );
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0, "none outside");
    // Reached at the address its name was checked to, and told its name.
    let host = good.last_headers.lock().expect("lock").get("host").cloned();
    assert_eq!(host, Some(format!("localhost:{}", good.addr.port())));
}

#[tokio::test]
async fn an_instance_network_that_is_no_network_is_refused_at_start_up() {
    let settings = Settings {
        http: HttpSettings::local(0),
        upstream: UpstreamSettings {
            instance_networks: vec!["10.0.0.0/8".into(), "office".into()],
            ..UpstreamSettings::default()
        },
        ..Settings::default()
    };
    let err = Application::build(settings)
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("upstream.instance_networks") && err.contains("`office`"),
        "{err}"
    );
}

/// Two instances of order-service, both known to the gateway.
async fn two_instances(s: &Stack, token: &str) -> (Upstream, Upstream) {
    let (a, b) = (upstream("a").await, upstream("b").await);
    s.register("order-service", &a).await;
    s.register("order-service", &b).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.hits.load(Ordering::SeqCst) == 0 || b.hits.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both instances known"
        );
        s.get_routed("/orders", token).await;
    }
    (a, b)
}

async fn post(s: &Stack, token: &str, key: Option<&str>) -> reqwest::Response {
    let mut request = s
        .client
        .post(format!("{}/orders", s.gateway))
        .bearer_auth(token)
        .json(&json!({"items": []}));
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.send().await.expect("post")
}

#[tokio::test]
async fn a_failed_get_is_retried_on_another_instance() {
    let s = stack(ROUTES, 2000).await;
    let token = s.token("alice", "alice-pw").await;
    let (a, b) = two_instances(&s, &token).await;
    a.failing_with.store(502, Ordering::SeqCst);
    let (a0, b0) = (a.hits.load(Ordering::SeqCst), b.hits.load(Ordering::SeqCst));
    for _ in 0..4 {
        let response = s.get("/orders", &token).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["upstream"], "b", "answered by the healthy instance");
    }
    assert!(
        a.hits.load(Ordering::SeqCst) > a0,
        "the sick instance was tried"
    );
    assert_eq!(b.hits.load(Ordering::SeqCst) - b0, 4);
}

#[tokio::test]
async fn a_sent_post_is_retried_only_with_an_idempotency_key() {
    let s = stack(ROUTES, 2000).await;
    let token = s.token("alice", "alice-pw").await;
    let (a, b) = two_instances(&s, &token).await;
    a.failing_with.store(503, Ordering::SeqCst);
    // Round robin reaches a within two requests; without a key its 503 comes back.
    let mut refused = 0;
    for _ in 0..2 {
        if post(&s, &token, None).await.status() == StatusCode::SERVICE_UNAVAILABLE {
            refused += 1;
        }
    }
    assert_eq!(
        refused, 1,
        "a's 503 is not retried for a POST without a key"
    );
    assert_eq!(
        a.posts.load(Ordering::SeqCst) + b.posts.load(Ordering::SeqCst),
        2,
        "each POST sent once"
    );

    for i in 0..2 {
        let response = post(&s, &token, Some(&format!("key-{i}"))).await;
        assert_eq!(response.status(), StatusCode::OK, "retried on b with a key");
    }
}

#[tokio::test]
async fn a_connection_failure_is_retried_for_any_method() {
    let s = stack(ROUTES, 2000).await;
    let token = s.token("alice", "alice-pw").await;
    let b = upstream("b").await;
    s.register("order-service", &b).await;
    s.get_routed("/orders", &token).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let settings = registry_settings(s.registry);
    RegistryClient::new(&settings)
        .expect("registry client")
        .register(
            &InstanceRegistration::for_bound("order-service", dead, &settings),
            60,
        )
        .await
        .expect("register");
    // Wait until the gateway knows both (the routes report lists two instances).
    let admin = s.token("admin", "admin-pw").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let report: Value = s
            .get("/actuator/gateway/routes", &admin)
            .await
            .json()
            .await
            .expect("json");
        let count = report
            .as_array()
            .and_then(|r| r.iter().find(|r| r["route_id"] == "orders"))
            .and_then(|r| r["instances"].as_array().map(Vec::len));
        if count == Some(2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        assert_eq!(post(&s, &token, None).await.status(), StatusCode::OK);
    }
    assert_eq!(
        b.posts.load(Ordering::SeqCst),
        4,
        "every POST reached b exactly once"
    );
}

#[tokio::test]
async fn a_failing_instance_is_ejected_then_returns_on_its_own() {
    let s = stack(ROUTES, 2000).await;
    let token = s.token("alice", "alice-pw").await;
    let (a, b) = two_instances(&s, &token).await;
    a.failing_with.store(500, Ordering::SeqCst);
    // 500 is not retried (not in the policy) but counts against a: three strikes.
    let mut strikes = 0;
    while strikes < 3 {
        if s.get("/orders", &token).await.status() == StatusCode::INTERNAL_SERVER_ERROR {
            strikes += 1;
        }
    }
    let a_after = a.hits.load(Ordering::SeqCst);
    let b_before = b.hits.load(Ordering::SeqCst);
    for _ in 0..6 {
        assert_eq!(s.get("/orders", &token).await.status(), StatusCode::OK);
    }
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        a_after,
        "ejected: no traffic"
    );
    assert_eq!(b.hits.load(Ordering::SeqCst) - b_before, 6);
    let admin = s.token("admin", "admin-pw").await;
    let report: Value = s
        .get("/actuator/gateway/routes", &admin)
        .await
        .json()
        .await
        .expect("json");
    let ejected: Vec<&Value> = report
        .as_array()
        .and_then(|r| r.iter().find(|r| r["route_id"] == "orders"))
        .and_then(|r| r["instances"].as_array())
        .map(|i| i.iter().filter(|i| i["ejected"] == true).collect())
        .unwrap_or_default();
    assert_eq!(
        ejected.len(),
        1,
        "the report shows the ejected instance: {report}"
    );
    assert_eq!(ejected[0]["address"], a.addr.to_string());
    assert_eq!(ejected[0]["receivesTraffic"], false);

    // a recovers; after its backoff (1 s) it receives traffic again by itself.
    a.failing_with.store(0, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while a.hits.load(Ordering::SeqCst) == a_after {
        assert!(tokio::time::Instant::now() < deadline, "a comes back");
        assert_eq!(s.get("/orders", &token).await.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_user_over_the_routes_rate_gets_429_with_retry_after() {
    let s = stack(ROUTES, 2000).await;
    let up = upstream("orders").await;
    s.register("order-service", &up).await;
    let alice = s.token("alice", "alice-pw").await;
    let admin = s.token("admin", "admin-pw").await;
    s.get_routed("/orders", &alice).await;

    let first = s.get("/limited/x", &alice).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()["ratelimit-limit"], "2");
    assert_eq!(first.headers()["ratelimit-remaining"], "1");
    assert_eq!(s.get("/limited/x", &alice).await.status(), StatusCode::OK);
    let refused = s.get("/limited/x", &alice).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["ratelimit-remaining"], "0");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    assert_eq!(
        s.get("/limited/x", &admin).await.status(),
        StatusCode::OK,
        "each user has a bucket of their own"
    );
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let s = stack(ROUTES, 2000).await;
    let token = s.token("alice", "alice-pw").await;
    let response = s
        .client
        .get(format!("{}/orders", s.gateway))
        .bearer_auth(&token)
        .header("x-padding", "p".repeat(20 * 1024))
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.status(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn the_gateway_owns_cors() {
    let s = stack(ROUTES, 2000).await;
    let up = upstream("orders").await;
    s.register("order-service", &up).await;
    let token = s.token("alice", "alice-pw").await;
    s.get_routed("/orders", &token).await;
    let preflight = |origin: &'static str| {
        s.client
            .request(reqwest::Method::OPTIONS, format!("{}/orders", s.gateway))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .send()
    };
    let allowed = preflight("https://shop.example.test")
        .await
        .expect("preflight");
    assert_eq!(
        allowed.status(),
        StatusCode::NO_CONTENT,
        "answered without a token"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example.test"
    );
    assert!(
        allowed.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap_or_default()
            .contains("authorization")
    );
    let hits = up.hits.load(Ordering::SeqCst);
    let refused = preflight("https://evil.example.test")
        .await
        .expect("preflight");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "preflights never reach a service"
    );

    let actual = s
        .client
        .get(format!("{}/orders", s.gateway))
        .bearer_auth(&token)
        .header("origin", "https://shop.example.test")
        .send()
        .await
        .expect("request");
    let origins: Vec<_> = actual
        .headers()
        .get_all("access-control-allow-origin")
        .iter()
        .collect();
    assert_eq!(
        origins,
        vec!["https://shop.example.test"],
        "one header, the gateway's"
    );
    // Caches must vary on what the upstream varies on and on the origin.
    let vary: Vec<String> = actual
        .headers()
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_ascii_lowercase()))
        .collect();
    assert!(
        vary.contains(&"accept-encoding".to_owned()) && vary.contains(&"origin".to_owned()),
        "{vary:?}"
    );
    // Browser code may read the headers it needs: the request id, Location, limits.
    let exposed = actual.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    for header in [
        "x-request-id",
        "location",
        "retry-after",
        "ratelimit-remaining",
    ] {
        assert!(exposed.contains(header), "{header} not exposed: {exposed}");
    }
}

async fn route_ids(s: &Stack, admin: &str) -> Vec<String> {
    let report: Value = s
        .get("/actuator/gateway/routes", admin)
        .await
        .json()
        .await
        .expect("json");
    report
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|r| r["route_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn routes_reload_on_file_change_and_on_refresh_and_a_bad_file_changes_nothing() {
    let s = stack(ROUTES, 2000).await;
    let admin = s.token("admin", "admin-pw").await;
    let alice = s.token("alice", "alice-pw").await;
    let up = upstream("orders").await;
    s.register("order-service", &up).await;
    assert!(!route_ids(&s, &admin).await.contains(&"extra".to_owned()));

    // A new route in the file, pointing at a service the gateway did not follow yet.
    let extra = format!(
        "{ROUTES}  - id: extra\n    uri: lb://inventory-service\n    predicates: [\"Path=/inventory/**\"]\n"
    );
    std::fs::write(&s.routes_file, &extra).expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !route_ids(&s, &admin).await.contains(&"extra".to_owned()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the file change is picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let inventory = upstream("inventory").await;
    s.register("inventory-service", &inventory).await;
    assert_eq!(
        s.get_routed("/inventory/items", &alice).await.status(),
        StatusCode::OK
    );

    // Refresh is for admins only.
    let refresh = |token: String| {
        s.client
            .post(format!("{}/actuator/gateway/refresh", s.gateway))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        refresh(alice.clone()).await.expect("refresh").status(),
        StatusCode::FORBIDDEN
    );

    // A broken file: refused by name, and the routes in force stay.
    std::fs::write(
        &s.routes_file,
        "routes: [{id: oops, uri: 'lb://x', predicates: [Colour=red]}]",
    )
    .expect("write");
    let refused = refresh(admin.clone()).await.expect("refresh");
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = refused.json().await.expect("problem");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("oops") && detail.contains("predicates[0]"),
        "{detail}"
    );
    assert!(
        route_ids(&s, &admin).await.contains(&"extra".to_owned()),
        "old routes in force"
    );
    assert_eq!(
        s.get("/inventory/items", &alice).await.status(),
        StatusCode::OK
    );

    // Fixed again, applied by refresh.
    std::fs::write(&s.routes_file, ROUTES).expect("write");
    let applied = refresh(admin.clone()).await.expect("refresh");
    assert_eq!(applied.status(), StatusCode::OK);
    assert!(!route_ids(&s, &admin).await.contains(&"extra".to_owned()));
}

#[tokio::test]
async fn a_circuit_breaker_opens_on_failures_refuses_fast_and_closes_after_a_good_trial() {
    let s = stack(ROUTES, 2000).await;
    let up = upstream("orders").await;
    s.register("order-service", &up).await;
    let token = s.token("alice", "alice-pw").await;
    s.get_routed("/orders", &token).await;
    up.failing_with.store(500, Ordering::SeqCst);
    for _ in 0..4 {
        let failed = s.get("/guarded/x", &token).await;
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // The upstream's plain JSON error becomes problem+json, keeping the
        // gateway's own headers.
        assert_eq!(failed.headers()["content-type"], "application/problem+json");
        assert!(
            failed.headers().contains_key("x-request-id"),
            "{:?}",
            failed.headers()
        );
        assert_eq!(failed.headers()["x-content-type-options"], "nosniff");
    }
    let hits = up.hits.load(Ordering::SeqCst);
    let open = s.get("/guarded/x", &token).await;
    assert_eq!(open.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(open.headers().contains_key("retry-after"));
    let problem: Value = open.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("orders-breaker")
    );
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "refused without touching the service"
    );

    // The upstream heals; after the wait, one trial goes through and closes the breaker.
    up.failing_with.store(0, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let status = s.get("/guarded/x", &token).await.status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker closes again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..3 {
        assert_eq!(s.get("/guarded/x", &token).await.status(), StatusCode::OK);
    }
}

const FALLBACK_ROUTES: &str = r#"
routes:
  - id: guarded
    uri: lb://order-service
    predicates: ["Path=/guarded/**"]
    filters:
      - name: CircuitBreaker
        args:
          name: orders-breaker
          fallbackUri: forward:/fallback/orders
          statusCodes: 418
          slidingWindowSize: 4
          minimumNumberOfCalls: 4
          waitDurationInOpenState: 60000
  - id: fallback
    uri: lb://payment-service
    predicates: ["Path=/fallback/**"]
    filters: ["AddResponseHeader=X-Fallback, yes"]
"#;

#[tokio::test]
async fn a_breakers_fallback_answers_for_a_failed_or_refused_upstream_as_spring_forwards() {
    let s = stack(FALLBACK_ROUTES, 2000).await;
    let orders = upstream("orders").await;
    let spare = upstream("spare").await;
    s.register("payment-service", &spare).await;
    let token = s.token("alice", "alice-pw").await;
    s.get_routed("/fallback/x", &token).await;

    // No instance of the service at all: the fallback route answers, with the
    // client's query, as if the client had asked its path.
    let answered = s.get("/guarded/a?page=2", &token).await;
    assert_eq!(answered.status(), StatusCode::OK);
    assert_eq!(answered.headers()["x-fallback"], "yes");
    let body: Value = answered.json().await.expect("json");
    assert_eq!(body["upstream"], "spare");
    assert_eq!(body["path"], "/fallback/orders");
    assert_eq!(body["query"], "page=2");

    // A status that statusCodes names goes to the fallback; a 500 stays the
    // upstream's answer, as in Spring (it still counts against the breaker).
    s.register("order-service", &orders).await;
    s.get_routed("/guarded/b", &token).await;
    orders.failing_with.store(418, Ordering::SeqCst);
    let teapot = s.get("/guarded/b", &token).await;
    assert_eq!(teapot.headers()["x-fallback"], "yes");
    orders.failing_with.store(500, Ordering::SeqCst);
    let plain = s.get("/guarded/b", &token).await;
    assert_eq!(plain.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(plain.headers().get("x-fallback").is_none());

    // Enough failures open the breaker: refused at once, and answered by the fallback
    // without touching the service.
    for _ in 0..4 {
        s.get("/guarded/b", &token).await;
    }
    let hits = orders.hits.load(Ordering::SeqCst);
    let refused = s.get("/guarded/b", &token).await;
    assert_eq!(refused.status(), StatusCode::OK);
    assert_eq!(refused.headers()["x-fallback"], "yes");
    assert_eq!(orders.hits.load(Ordering::SeqCst), hits);
}

/// A gateway routing every path (then `more_routes`) to `svc`, with one instance, once
/// it does; and alice's token.
async fn routed_to_one_instance(more_routes: &str) -> (Stack, Upstream, String) {
    routed_to_one_instance_within(more_routes, 10_000).await
}

/// [`routed_to_one_instance`] with a response timeout of `timeout_ms`.
async fn routed_to_one_instance_within(
    more_routes: &str,
    timeout_ms: u64,
) -> (Stack, Upstream, String) {
    let routes = format!(
        r#"
routes:
  - id: everything
    uri: lb://svc
    predicates: ["Path=/**"]
{more_routes}"#
    );
    let s = stack(&routes, timeout_ms).await;
    let up = upstream("svc-1").await;
    s.register("svc", &up).await;
    let token = s.token("alice", "alice-pw").await;
    shared::testing::eventually(
        Duration::from_secs(10),
        "the gateway routes to svc",
        async || (s.get("/anything", &token).await.status() == StatusCode::OK).then_some(()),
    )
    .await;
    (s, up, token)
}

/// An instance that goes DOWN while a request is at it finishes that request, whose
/// answer reaches the client, and gets no new ones: a status change drains an
/// instance, it does not cut what it is doing (as Eureka's clients and Spring's
/// balancer behave).
#[tokio::test]
async fn an_instance_that_goes_down_mid_request_finishes_it_and_gets_no_more() {
    // Time enough for the held request however slowly the rest goes.
    let (s, first, token) = routed_to_one_instance_within("", 120_000).await;
    let before = first.hits.load(Ordering::SeqCst);
    let held = {
        let (client, url) = (s.client.clone(), format!("{}/held", s.gateway));
        let token = token.clone();
        tokio::spawn(async move { client.get(url).bearer_auth(token).send().await })
    };
    shared::testing::eventually(
        Duration::from_secs(10),
        "the held request reaches the first instance",
        async || (first.hits.load(Ordering::SeqCst) > before).then_some(()),
    )
    .await;

    // DOWN before the second instance exists: the list that first shows the second
    // shows the first DOWN too, so no request can still go there after.
    let settings = registry_settings(s.registry);
    let first_id = InstanceRegistration::for_bound("svc", first.addr, &settings).instance_id;
    RegistryClient::new(&settings)
        .expect("registry client")
        .set_status("svc", &first_id, "DOWN")
        .await
        .expect("status");
    let second = upstream("svc-2").await;
    s.register("svc", &second).await;
    let upstream_of = async |response: reqwest::Response| -> Option<String> {
        let body: Value = response.json().await.ok()?;
        body["upstream"].as_str().map(str::to_owned)
    };
    shared::testing::eventually(
        Duration::from_secs(10),
        "the gateway routes to the second instance",
        async || {
            let response = s.get("/anything", &token).await;
            (upstream_of(response).await.as_deref() == Some("svc-2")).then_some(())
        },
    )
    .await;
    let at_first = first.hits.load(Ordering::SeqCst);
    for _ in 0..5 {
        let response = s.get("/anything", &token).await;
        assert_eq!(upstream_of(response).await.as_deref(), Some("svc-2"));
    }
    assert_eq!(
        first.hits.load(Ordering::SeqCst),
        at_first,
        "nothing new for a DOWN instance"
    );
    assert!(
        !held.is_finished(),
        "the held request is still at the first instance"
    );

    first.release.notify_one();
    let answer = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("answered in time")
        .expect("task")
        .expect("response");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(upstream_of(answer).await.as_deref(), Some("svc-1"));
}

/// `CONNECT` asks a forward proxy for a tunnel, and the gateway is none: whatever its
/// routes say, such a request is refused with what the gateway allows, and nothing
/// reaches a service.
#[tokio::test]
async fn a_connect_request_gets_no_tunnel() {
    let (s, up, token) = routed_to_one_instance(
        r#"
  - id: by-method
    uri: lb://svc
    predicates: ["Method=CONNECT"]
"#,
    )
    .await;
    let hits = up.hits.load(Ordering::SeqCst);
    let address = s.gateway.trim_start_matches("http://").to_owned();
    for target in [up.addr.to_string(), "example.com:443".to_owned()] {
        let request = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let status =
            shared::testing::status_line_or_closed(address.as_str(), request.as_bytes()).await;
        assert_eq!(
            status, "HTTP/1.1 405 Method Not Allowed",
            "CONNECT {target}"
        );
    }
    assert_eq!(
        up.hits.load(Ordering::SeqCst),
        hits,
        "a CONNECT reached the service"
    );
}

/// A pooled upstream connection, idle, has the kernel's keepalive timer armed: an
/// upstream that vanished is found by probes (a joined WebSocket's too), not waited on.
#[tokio::test]
async fn pooled_upstream_connections_probe_their_peer() {
    let (_stack, up, _token) = routed_to_one_instance("").await;
    shared::testing::eventually(
        Duration::from_secs(5),
        "the gateway's pooled connection to the upstream has its keepalive timer armed",
        async || shared::testing::probes_peer(None, up.addr.port()).then_some(()),
    )
    .await;
}
