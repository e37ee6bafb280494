//! `RequestRateLimiter` with Redis (`redis.url`): two gateway instances in front of the
//! same upstream count against one limit, as Spring Cloud Gateway's
//! `redis-rate-limiter` does; and a Redis that cannot be reached lets requests through
//! rather than take the route down.

mod support;

use std::net::SocketAddr;

use reqwest::StatusCode;
use serde_json::Value;
use support::{alice_bearer, registry, start_gateway};

async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(|| async { "ok" });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn routes(route: &str, upstream: SocketAddr) -> String {
    format!(
        r#"
routes:
  - id: {route}
    uri: http://{upstream}
    predicates: ["Path=/limited/**"]
    filters:
      - name: RequestRateLimiter
        args:
          redis-rate-limiter.replenishRate: 1
          redis-rate-limiter.burstCapacity: 3
          keyResolver: user
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_redis_share_one_limit() {
    let redis = std::env::var("STOREFRONT_REDIS_URL")
        .expect("STOREFRONT_REDIS_URL names the test Redis; run the tests with `cargo xtask test`");
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _stop_registry) = registry().await;
    // A route id of its own: the buckets of an earlier run in this Redis are not its.
    let route = format!("limited-{}", std::process::id());
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes(&route, upstream().await)).expect("routes");
    // The same settings (and so the same signing key) for both: one token works at
    // either, as behind a load balancer.
    let mut settings = support::gateway_settings(registry, &routes_file);
    settings.redis.url = Some(redis);
    let (first, _a) = start_gateway(settings.clone()).await;
    let (second, _b) = start_gateway(settings).await;
    let client = reqwest::Client::new();
    let bearer = alice_bearer(&first).await;
    let get = async |gateway: &str| {
        client
            .get(format!("{gateway}/limited/x"))
            .header("authorization", &bearer)
            .send()
            .await
            .expect("through the gateway")
    };

    // The burst of three, spent at the first gateway.
    for n in 0..3 {
        let response = get(&first).await;
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
        assert_eq!(
            response.headers()["ratelimit-remaining"],
            (2 - n).to_string().as_str()
        );
    }
    // The second gateway counts against the same bucket: refused at once.
    let refused = get(&second).await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()["retry-after"], "1");
    let problem: Value = refused.json().await.expect("problem+json");
    assert_eq!(problem["status"], 429, "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_cannot_be_reached_lets_requests_through() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _stop_registry) = registry().await;
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, routes("limited", upstream().await)).expect("routes");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut settings = support::gateway_settings(registry, &routes_file);
    settings.redis.url = Some(format!("redis://{closed}"));
    let (gateway, _stop) = start_gateway(settings).await;
    let client = reqwest::Client::new();
    let bearer = alice_bearer(&gateway).await;
    // Past the burst of three, all pass: the limiter is down, the route is not.
    for n in 0..5 {
        let response = client
            .get(format!("{gateway}/limited/x"))
            .header("authorization", &bearer)
            .send()
            .await
            .expect("through the gateway");
        assert_eq!(response.status(), StatusCode::OK, "request {n}");
    }
}

#[tokio::test]
async fn a_redis_url_that_is_not_one_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _stop_registry) = registry().await;
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, "routes: []\n").expect("routes");
    let mut settings = support::gateway_settings(registry, &routes_file);
    settings.redis.url = Some("memcached://127.0.0.1:11211".into());
    let refused = gateway::Application::build(settings)
        .await
        .expect_err("refused")
        .to_string();
    assert!(refused.contains("redis.url"), "{refused}");
}
