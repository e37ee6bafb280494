//! The gateway's own credentials under attack: failed logins throttled per user name
//! and per client address (429), a flood of logins shed at the bound on concurrent
//! password checks (503), both with `Retry-After`, and the real user still served
//! afterwards; and Prometheus's static scrape credential, which opens nothing else.

mod support;

use std::time::Duration;

use gateway::login::LoginSettings;
use reqwest::StatusCode;
use serde_json::{Value, json};

use support::RunningGateway as Gateway;

async fn gateway(login: LoginSettings) -> Gateway {
    support::spawn_gateway(|settings| settings.auth.login = login).await
}

trait Login {
    async fn login(&self, user: &str, password: &str) -> reqwest::Response;
}

impl Login for Gateway {
    async fn login(&self, user: &str, password: &str) -> reqwest::Response {
        self.client
            .post(format!("{}/auth/token", self.base))
            .json(&json!({"username": user, "password": password}))
            .send()
            .await
            .expect("an answer")
    }
}

/// Asserts `response` is a problem with `status` and a `Retry-After` of 1..=`max`
/// seconds; returns its detail.
async fn assert_retry_later(response: reqwest::Response, status: StatusCode, max: u64) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(
        (1..=max).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let problem: Value = response.json().await.expect("problem");
    problem["detail"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn failed_logins_for_one_name_throttle_that_name_only() {
    let gateway = gateway(LoginSettings {
        max_failures_per_user: 3,
        max_failures_per_address: 1000,
        ..LoginSettings::default()
    })
    .await;
    for _ in 0..3 {
        let wrong = gateway.login("alice", "guess").await;
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    }
    // Even the right password waits now: a guesser cannot tell it was right.
    let detail = assert_retry_later(
        gateway.login("alice", "alice-pw").await,
        StatusCode::TOO_MANY_REQUESTS,
        60,
    )
    .await;
    assert!(detail.contains("retry in"), "{detail}");
    // Other names, from the same address, are not held up.
    assert_eq!(
        gateway.login("admin", "admin-pw").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_address_guessing_many_names_is_throttled() {
    let gateway = gateway(LoginSettings {
        max_failures_per_user: 1000,
        max_failures_per_address: 3,
        ..LoginSettings::default()
    })
    .await;
    for name in ["mallory-1", "mallory-2", "mallory-3"] {
        assert_eq!(
            gateway.login(name, "x").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_retry_later(
        gateway.login("admin", "admin-pw").await,
        StatusCode::TOO_MANY_REQUESTS,
        60,
    )
    .await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_is_throttled_as_itself() {
    // Every login comes from the load balancer's address (127.0.0.1 here); the
    // address it names in X-Forwarded-For is the client's.
    let gateway = support::spawn_gateway(|settings| {
        settings.auth.login = LoginSettings {
            max_failures_per_user: 1000,
            max_failures_per_address: 3,
            ..LoginSettings::default()
        };
        settings.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let login = |client: &'static str, user: &'static str, password: &'static str| {
        gateway
            .client
            .post(format!("{}/auth/token", gateway.base))
            .header("x-forwarded-for", client)
            .json(&json!({"username": user, "password": password}))
            .send()
    };
    for name in ["mallory-1", "mallory-2", "mallory-3"] {
        let answer = login("198.51.100.66", name, "x").await.expect("answer");
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    }
    let guesser = login("198.51.100.66", "admin", "admin-pw")
        .await
        .expect("answer");
    assert_eq!(guesser.status(), StatusCode::TOO_MANY_REQUESTS);
    let someone_else = login("198.51.100.7", "admin", "admin-pw")
        .await
        .expect("answer");
    assert_eq!(
        someone_else.status(),
        StatusCode::OK,
        "another client behind the same balancer is not locked out"
    );
}

#[tokio::test]
async fn a_login_flood_is_shed_at_the_check_bound_and_the_user_still_gets_in() {
    let gateway = gateway(LoginSettings {
        max_concurrent_checks: 1,
        max_failures_per_user: 1000,
        max_failures_per_address: 1000,
        ..LoginSettings::default()
    })
    .await;
    // Forty unknown users at once against one check slot: an argon2 check takes tens
    // of milliseconds, so most of them find it taken.
    let flood = (0..40).map(|i| {
        let gateway = &gateway;
        async move { gateway.login(&format!("nobody-{i}"), "x").await }
    });
    let answers = futures::future::join_all(flood).await;
    let mut shed = 0;
    for answer in answers {
        match answer.status() {
            StatusCode::UNAUTHORIZED => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                shed += 1;
                assert_retry_later(answer, StatusCode::SERVICE_UNAVAILABLE, 1).await;
            }
            other => panic!("a flooded login answered {other}"),
        }
    }
    assert!(shed > 0, "nothing was shed: the bound is not there");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = gateway.login("alice", "alice-pw").await.status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_with_its_static_credential_and_nothing_else_opens() {
    let gateway = support::spawn_gateway(|settings| {
        settings.auth.metrics_token = Some("scrape-secret-123".into());
    })
    .await;
    let get = |path: &str, token: &str| {
        gateway
            .client
            .get(format!("{}{path}", gateway.base))
            .bearer_auth(token)
            .send()
    };
    let scrape = get("/actuator/prometheus", "scrape-secret-123")
        .await
        .expect("scrape");
    assert_eq!(scrape.status(), StatusCode::OK);
    for (path, token) in [
        ("/actuator/prometheus", "scrape-secret-12"),
        ("/actuator/prometheus", "not-it"),
        ("/actuator/info", "scrape-secret-123"),
        ("/actuator/gateway/routes", "scrape-secret-123"),
    ] {
        let refused = get(path, token).await.expect("answer");
        assert_eq!(
            refused.status(),
            StatusCode::UNAUTHORIZED,
            "{path} with {token}"
        );
    }
}

/// A failed login's name is kept for throttling, so names (and passwords) are bounded,
/// and so is the body: over-long fields get 422 naming them, an oversized body 413,
/// neither counted as a failure, and the real user still logs in.
#[tokio::test]
async fn over_long_names_and_bodies_are_refused_before_any_check() {
    let gateway = gateway(LoginSettings {
        max_failures_per_user: 1,
        max_failures_per_address: 1,
        ..LoginSettings::default()
    })
    .await;
    let long_name = "a".repeat(256);
    let refused = gateway.login(&long_name, "guess").await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = refused.json().await.expect("problem");
    assert_eq!(problem["errors"][0]["field"], "username", "{problem}");
    assert!(
        problem["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("255")),
        "{problem}"
    );
    let refused = gateway.login("alice", &"p".repeat(1025)).await;
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let oversized = gateway
        .client
        .post(format!("{}/auth/token", gateway.base))
        .json(&json!({"username": "alice", "password": "x".repeat(20_000)}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(oversized.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        oversized.headers()["content-type"],
        "application/problem+json"
    );

    // None of them counted as a failed login from this address (one is the limit).
    assert_eq!(
        gateway.login("alice", "alice-pw").await.status(),
        StatusCode::OK
    );
}
