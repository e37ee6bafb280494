//! The registry started in-process on port 0 and driven over HTTP: leases, the watch,
//! self-preservation, write authentication, bad input, the dashboard, and a real
//! Eureka client written by someone else.

use std::time::{Duration, Instant};

use futures::StreamExt;
use registry::{Application, Settings, auth::AuthSettings};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use shared::config::HttpSettings;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789";

struct Registry {
    base: String,
    client: Client,
    _stop: DropCancel,
}

struct DropCancel(CancellationToken);

impl Drop for DropCancel {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn spawn_with(mut settings: Settings) -> Registry {
    settings.http = HttpSettings::local(0);
    let app = Application::build(settings).await.expect("builds");
    let base = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(app.run_until_stopped(stop.clone()));
    Registry {
        base,
        client: Client::new(),
        _stop: DropCancel(stop),
    }
}

async fn spawn() -> Registry {
    spawn_with(Settings {
        auth: AuthSettings {
            token: Some(TOKEN.into()),
            protect_reads: false,
            ..Default::default()
        },
        ..Settings::default()
    })
    .await
}

impl Registry {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn register(&self, service: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/api/v1/services/{service}/instances")))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("register")
    }

    async fn heartbeat(&self, service: &str, id: &str) -> StatusCode {
        self.client
            .put(self.url(&format!(
                "/api/v1/services/{service}/instances/{id}/heartbeat"
            )))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("heartbeat")
            .status()
    }

    async fn get(&self, path: &str) -> Value {
        self.client
            .get(self.url(path))
            .header("accept", "application/json")
            .send()
            .await
            .expect("get")
            .json()
            .await
            .expect("json")
    }

    /// An open `/api/v1/watch` stream.
    async fn watch(&self, query: &str) -> Watch {
        let response = self
            .client
            .get(self.url(&format!("/api/v1/watch{query}")))
            .send()
            .await
            .expect("watch");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "a server-sent-event stream"
        );
        Watch {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }
}

struct Watch {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Watch {
    /// The next event's name and data, waiting at most `within`.
    async fn next(&mut self, within: Duration) -> (String, Value) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if event.is_empty() {
                    continue; // a keep-alive comment
                }
                return (
                    event,
                    serde_json::from_str(&data).expect("event data is JSON"),
                );
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .expect("an event in time")
                .expect("the stream stays open")
                .expect("no stream error");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

fn instance(host: &str, port: u16, lease: u32) -> Value {
    json!({ "host": host, "port": port, "leaseSeconds": lease })
}

#[tokio::test]
async fn a_lease_ends_on_time_and_watchers_hear_of_it_within_a_second() {
    let registry = spawn().await;
    let mut watch = registry.watch("?service=orders").await;
    assert_eq!(watch.next(Duration::from_secs(5)).await.0, "snapshot");

    let registered = Instant::now();
    let response = registry
        .register(
            "orders",
            json!({ "instanceId": "o-1", "host": "127.0.0.1", "port": 8081, "leaseSeconds": 1 }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let (event, added) = watch.next(Duration::from_secs(5)).await;
    assert_eq!(
        (event.as_str(), added["action"].as_str()),
        ("change", Some("ADDED"))
    );

    let (_, removed) = watch.next(Duration::from_secs(5)).await;
    let elapsed = registered.elapsed();
    assert_eq!(removed["action"], "DELETED");
    assert_eq!(removed["cause"], "expired");
    assert!(
        elapsed >= Duration::from_millis(1000),
        "not removed before its lease ended: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(2000),
        "removed within a second of its end: {elapsed:?}"
    );
    let listed = registry.get("/api/v1/services/orders/instances").await;
    assert_eq!(listed["instances"], json!([]));
}

#[tokio::test]
async fn an_unknown_heartbeat_is_404_and_registering_again_fixes_it() {
    let registry = spawn().await;
    assert_eq!(
        registry.heartbeat("orders", "o-9").await,
        StatusCode::NOT_FOUND
    );
    let response = registry
        .register(
            "ORDERS",
            json!({ "instanceId": "o-9", "host": "127.0.0.1", "port": 8081 }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["location"],
        "/api/v1/services/orders/instances/o-9",
        "names are case-insensitive"
    );
    assert_eq!(registry.heartbeat("Orders", "o-9").await, StatusCode::OK);
}

#[tokio::test]
async fn watchers_wake_on_register_status_change_and_override() {
    let registry = spawn().await;
    let mut watch = registry.watch("").await;
    let (_, snapshot) = watch.next(Duration::from_secs(5)).await;
    let index = snapshot["index"].as_u64().expect("index");

    // A blocking query started before the change returns because of it.
    let blocking = {
        let url = registry.url(&format!(
            "/api/v1/services/orders/instances?index={index}&wait=10s"
        ));
        let client = registry.client.clone();
        tokio::spawn(async move { client.get(url).send().await?.json::<Value>().await })
    };
    registry
        .register(
            "orders",
            json!({ "instanceId": "o-1", "host": "127.0.0.1", "port": 8081 }),
        )
        .await;
    let (_, added) = watch.next(Duration::from_secs(2)).await;
    assert_eq!(added["action"], "ADDED");
    let woke = blocking.await.expect("join").expect("answer");
    assert!(woke["index"].as_u64() > Some(index));
    assert_eq!(woke["instances"][0]["instanceId"], "o-1");

    registry
        .client
        .put(registry.url("/api/v1/services/orders/instances/o-1/status"))
        .bearer_auth(TOKEN)
        .json(&json!({ "status": "DRAINING" }))
        .send()
        .await
        .expect("status");
    let (_, drained) = watch.next(Duration::from_secs(2)).await;
    assert_eq!(drained["cause"], "status");
    assert_eq!(drained["instance"]["status"], "DRAINING");

    registry
        .client
        .put(registry.url("/api/v1/services/orders/instances/o-1/override"))
        .bearer_auth(TOKEN)
        .json(&json!({ "status": "OUT_OF_SERVICE" }))
        .send()
        .await
        .expect("override");
    let (_, overridden) = watch.next(Duration::from_secs(2)).await;
    assert_eq!(overridden["cause"], "override");
    assert_eq!(overridden["instance"]["status"], "OUT_OF_SERVICE");

    let filtered = registry
        .get("/api/v1/services/orders/instances?status=UP")
        .await;
    assert_eq!(filtered["instances"], json!([]), "only UP instances listed");
}

#[tokio::test]
async fn an_operator_override_survives_eureka_heartbeats_until_removed() {
    let registry = spawn().await;
    let client = &registry.client;
    let eureka = |path: &str| registry.url(&format!("/eureka{path}"));
    let status = client
        .post(eureka("/apps/BILLING"))
        .bearer_auth(TOKEN)
        .json(&json!({ "instance": {
            "instanceId": "b-1", "hostName": "127.0.0.1", "app": "BILLING", "ipAddr": "127.0.0.1",
            "status": "UP", "port": { "$": 9100, "@enabled": "true" },
            "leaseInfo": { "durationInSecs": 30 },
            "dataCenterInfo": { "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn" }
        }}))
        .send()
        .await
        .expect("register")
        .status();
    assert_eq!(status, StatusCode::NO_CONTENT);
    let put = client
        .put(eureka("/apps/billing/b-1/status?value=OUT_OF_SERVICE"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("override");
    assert_eq!(put.status(), StatusCode::OK);
    // The instance keeps saying it is UP with each renewal; the override wins.
    for _ in 0..3 {
        let renew = client
            .put(eureka("/apps/BILLING/b-1?status=UP&lastDirtyTimestamp=1"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("renew");
        assert_eq!(renew.status(), StatusCode::OK);
    }
    let shown = registry.get("/eureka/apps/BILLING/b-1").await;
    assert_eq!(shown["instance"]["status"], "OUT_OF_SERVICE");
    assert_eq!(shown["instance"]["overriddenStatus"], "OUT_OF_SERVICE");

    let delete = client
        .delete(eureka("/apps/BILLING/b-1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("remove override");
    assert_eq!(delete.status(), StatusCode::OK);
    let shown = registry.get("/eureka/apps/BILLING/b-1").await;
    assert_eq!(shown["instance"]["status"], "UP");
    let unknown = client
        .put(eureka("/apps/BILLING/nope"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("renew unknown");
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn self_preservation_starts_on_mass_expiry_is_explained_and_ends_when_renewals_resume() {
    let registry = spawn().await;
    for id in 0..4 {
        let r = registry
            .register(
                "orders",
                json!({ "instanceId": format!("o-{id}"), "host": "127.0.0.1", "port": 8081 + id, "leaseSeconds": 1 }),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // All four leases end within milliseconds: the registry suspects itself. Leases
    // that ended before the threshold was reached were evicted at once, by design.
    let state = wait_state(&registry, |s| !s["selfPreservation"].is_null()).await;
    let p = &state["selfPreservation"];
    assert_eq!(p["threshold"], 3, "at least min_expiries");
    assert!(p["expiredInWindow"].as_u64() >= Some(3), "{p}");
    assert_eq!(p["instances"], 4, "counted against all four: {p}");
    assert!(
        p["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("of 4 leases expired"),
        "{p}"
    );
    assert!(p["until"].as_u64() > p["since"].as_u64(), "bounded in time");
    let listed = registry.get("/api/v1/services/orders/instances").await;
    let kept: Vec<String> = listed["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["instanceId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    // How many ended before the threshold depends on where reaper ticks fell between
    // the four registrations; what is listed now is kept past its lease.
    assert!(!kept.is_empty(), "expired instances are kept: {listed}");
    assert!(
        listed["instances"]
            .as_array()
            .is_some_and(|a| a.iter().all(|i| i["leaseRemainingMs"] == 0)),
        "every kept lease has ended: {listed}"
    );
    let page = registry
        .client
        .get(registry.url("/"))
        .send()
        .await
        .expect("page");
    assert!(
        page.text()
            .await
            .unwrap_or_default()
            .contains("Self-preservation is ON")
    );

    // The clients reach the registry again and renew what was kept.
    for id in &kept {
        assert_eq!(registry.heartbeat("orders", id).await, StatusCode::OK);
    }
    let state = wait_state(&registry, |s| s["selfPreservation"].is_null()).await;
    assert_eq!(state["lastSelfPreservationEnd"]["why"], "renewals resumed");
    assert_eq!(state["instances"].as_u64(), Some(kept.len() as u64));
}

/// Follows `/api/v1/state` with blocking queries until `done` holds.
async fn wait_state(registry: &Registry, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut index = 0;
    loop {
        let state = registry.get("/api/v1/state").await;
        if done(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "state never matched: {state}");
        index = state["index"].as_u64().unwrap_or(index);
        let _ = registry
            .get(&format!("/api/v1/services?index={index}&wait=2s"))
            .await;
    }
}

#[tokio::test]
async fn writes_need_the_token_reads_do_not() {
    let registry = spawn().await;
    let client = &registry.client;
    let url = registry.url("/api/v1/services/orders/instances");
    let anonymous = client
        .post(&url)
        .json(&instance("127.0.0.1", 8081, 10))
        .send()
        .await
        .expect("post");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(
        anonymous.headers()["www-authenticate"]
            .to_str()
            .unwrap_or_default()
            .contains("Bearer")
    );
    assert_eq!(
        anonymous.headers()["content-type"],
        "application/problem+json"
    );
    let wrong = client
        .post(&url)
        .bearer_auth("not-the-token")
        .json(&instance("127.0.0.1", 8081, 10))
        .send()
        .await
        .expect("post");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let eureka_wrong = client
        .delete(registry.url("/eureka/apps/ORDERS/x"))
        .basic_auth("eureka", Some("nope"))
        .send()
        .await
        .expect("delete");
    assert_eq!(eureka_wrong.status(), StatusCode::UNAUTHORIZED);

    let basic = client
        .post(&url)
        .basic_auth("any-user", Some(TOKEN))
        .json(&instance("127.0.0.1", 8081, 10))
        .send()
        .await
        .expect("post");
    assert_eq!(
        basic.status(),
        StatusCode::CREATED,
        "Basic with the token as password"
    );
    let read = client.get(&url).send().await.expect("get");
    assert_eq!(read.status(), StatusCode::OK, "reads are open");
    assert_eq!(
        registry.get("/api/v1/services/orders/instances").await["instances"][0]["port"],
        8081
    );
}

#[tokio::test]
async fn a_service_credential_writes_only_its_own_service_and_never_overrides() {
    let registry = spawn().await;
    let client = &registry.client;
    let orders = shared::registry::service_credential(TOKEN, "orders");
    let own = client
        .post(registry.url("/api/v1/services/orders/instances"))
        .bearer_auth(&orders)
        .json(&json!({"instanceId": "o-1", "host": "127.0.0.1", "port": 8081}))
        .send()
        .await
        .expect("post");
    assert_eq!(own.status(), StatusCode::CREATED);
    // Another service's name, natively or through the Eureka API: refused.
    let other = client
        .post(registry.url("/api/v1/services/payments/instances"))
        .bearer_auth(&orders)
        .json(&json!({"instanceId": "evil", "host": "203.0.113.9", "port": 443}))
        .send()
        .await
        .expect("post");
    assert_eq!(other.status(), StatusCode::FORBIDDEN);
    assert_eq!(other.headers()["content-type"], "application/problem+json");
    let eureka_other = client
        .delete(registry.url("/eureka/apps/PAYMENTS/p-1"))
        .basic_auth("eureka", Some(&orders))
        .send()
        .await
        .expect("delete");
    assert_eq!(eureka_other.status(), StatusCode::FORBIDDEN);
    // Overrides are the operator's, even on its own instance.
    let override_path = "/api/v1/services/orders/instances/o-1/override";
    let refused = client
        .put(registry.url(override_path))
        .bearer_auth(&orders)
        .json(&json!({"status": "OUT_OF_SERVICE"}))
        .send()
        .await
        .expect("put");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let operator = client
        .put(registry.url(override_path))
        .bearer_auth(TOKEN)
        .json(&json!({"status": "OUT_OF_SERVICE"}))
        .send()
        .await
        .expect("put");
    assert!(operator.status().is_success(), "{}", operator.status());
    // A credential of another registry's token is nothing here.
    let foreign = shared::registry::service_credential("another-token", "orders");
    let forged = client
        .put(registry.url("/api/v1/services/orders/instances/o-1/heartbeat"))
        .bearer_auth(&foreign)
        .send()
        .await
        .expect("put");
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    let renewed = client
        .put(registry.url("/api/v1/services/orders/instances/o-1/heartbeat"))
        .bearer_auth(&orders)
        .send()
        .await
        .expect("put");
    assert_eq!(renewed.status(), StatusCode::OK);
}

#[tokio::test]
async fn only_the_operator_token_changes_log_levels() {
    let _telemetry = shared::telemetry::init(
        "registry",
        &shared::telemetry::LogSettings {
            level: "error".into(),
            ..Default::default()
        },
        &Default::default(),
    )
    .expect("telemetry");
    let registry = spawn().await;
    let set = |credential: Option<String>| {
        let mut request = registry
            .client
            .post(registry.url("/actuator/loggers/registry"))
            .json(&json!({"configuredLevel": "DEBUG"}));
        if let Some(credential) = credential {
            request = request.bearer_auth(credential);
        }
        request.send()
    };
    let anonymous = set(None).await.expect("post");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let service = set(Some(shared::registry::service_credential(TOKEN, "orders")))
        .await
        .expect("post");
    assert_eq!(service.status(), StatusCode::FORBIDDEN);
    let operator = set(Some(TOKEN.to_owned())).await.expect("post");
    assert_eq!(operator.status(), StatusCode::NO_CONTENT);
    let now: Value = registry
        .client
        .get(registry.url("/actuator/loggers/registry"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(now["configuredLevel"], "DEBUG");
}

#[tokio::test]
async fn protect_reads_covers_every_read_the_dashboard_included() {
    let registry = spawn_with(Settings {
        auth: AuthSettings {
            token: Some(TOKEN.into()),
            protect_reads: true,
            ..Default::default()
        },
        ..Settings::default()
    })
    .await;
    let orders = shared::registry::service_credential(TOKEN, "orders");
    for path in ["/", "/api/v1/instances", "/api/v1/services", "/eureka/apps"] {
        let anonymous = registry
            .client
            .get(registry.url(path))
            .send()
            .await
            .expect("get");
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "{path}");
        let allowed = registry
            .client
            .get(registry.url(path))
            .bearer_auth(&orders)
            .send()
            .await
            .expect("get");
        assert_eq!(allowed.status(), StatusCode::OK, "{path}");
    }
    let health = registry
        .client
        .get(registry.url("/actuator/health"))
        .send()
        .await
        .expect("get");
    assert_eq!(health.status(), StatusCode::OK, "health stays open");
}

#[tokio::test]
async fn without_a_token_the_registry_refuses_to_start_unless_told_writes_may_be_open() {
    let refused = Application::build(Settings {
        http: HttpSettings::local(0),
        ..Settings::default()
    })
    .await;
    let Err(error) = refused else {
        panic!("a registry without a token started");
    };
    let error = error.to_string();
    assert!(error.contains("open_writes"), "{error}");
    let open = Application::build(Settings {
        http: HttpSettings::local(0),
        auth: AuthSettings {
            open_writes: true,
            ..Default::default()
        },
        ..Settings::default()
    })
    .await;
    assert!(open.is_ok());
}

#[tokio::test]
async fn a_service_cannot_grow_past_its_instance_cap() {
    let mut settings = Settings {
        auth: AuthSettings {
            token: Some(TOKEN.into()),
            ..Default::default()
        },
        ..Settings::default()
    };
    settings.leases.max_instances_per_service = 2;
    let registry = spawn_with(settings).await;
    for id in ["o-1", "o-2"] {
        let created = registry
            .register(
                "orders",
                json!({"instanceId": id, "host": "127.0.0.1", "port": 8081}),
            )
            .await;
        assert_eq!(created.status(), StatusCode::CREATED);
    }
    let third = registry
        .register(
            "orders",
            json!({"instanceId": "o-3", "host": "127.0.0.1", "port": 8083}),
        )
        .await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    let problem: Value = third.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("max_instances_per_service")),
        "{problem}"
    );
    let eureka_third = registry
        .client
        .post(registry.url("/eureka/apps/ORDERS"))
        .basic_auth("eureka", Some(TOKEN))
        .json(&json!({"instance": {"instanceId": "o-4", "hostName": "127.0.0.1",
            "app": "ORDERS", "status": "UP", "port": {"$": 8084, "@enabled": "true"},
            "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"}}}))
        .send()
        .await
        .expect("post");
    assert_eq!(eureka_third.status(), StatusCode::TOO_MANY_REQUESTS);
    // Re-registering a listed instance, and other services, are not held back.
    let again = registry
        .register(
            "orders",
            json!({"instanceId": "o-1", "host": "127.0.0.1", "port": 8081}),
        )
        .await;
    assert_eq!(again.status(), StatusCode::CREATED);
    let other = registry
        .register(
            "payments",
            json!({"instanceId": "p-1", "host": "127.0.0.1", "port": 8090}),
        )
        .await;
    assert_eq!(other.status(), StatusCode::CREATED);
}

/// Watches and blocking queries hold their connections busy, and reads need no token:
/// one client may hold only `max_watchers_per_client` of them, past which it gets
/// 503 with `Retry-After`, while its plain reads and others' writes go on.
#[tokio::test]
async fn one_client_cannot_hold_more_than_its_share_of_watches() {
    let mut settings = Settings {
        auth: AuthSettings {
            token: Some(TOKEN.into()),
            protect_reads: false,
            ..Default::default()
        },
        ..Settings::default()
    };
    settings.leases.max_watchers_per_client = 2;
    let registry = spawn_with(settings).await;
    let mut first = registry.watch("").await;
    assert_eq!(first.next(Duration::from_secs(5)).await.0, "snapshot");
    let mut second = registry.watch("?service=orders").await;
    assert_eq!(second.next(Duration::from_secs(5)).await.0, "snapshot");

    let third = registry
        .client
        .get(registry.url("/api/v1/watch"))
        .send()
        .await
        .expect("answer");
    assert_eq!(third.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.headers()["retry-after"], "5");
    assert_eq!(third.headers()["content-type"], "application/problem+json");
    let problem: Value = third.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("max_watchers_per_client")),
        "{problem}"
    );
    let index = registry.get("/api/v1/services").await["index"]
        .as_u64()
        .expect("index");
    let blocking = registry
        .client
        .get(registry.url(&format!("/api/v1/services?index={index}&wait=30s")))
        .send()
        .await
        .expect("answer");
    assert_eq!(blocking.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Reads that do not wait, and writes, are not held back.
    let created = registry
        .register(
            "orders",
            json!({"instanceId": "o-1", "host": "127.0.0.1", "port": 8081}),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(
        registry.get("/api/v1/services").await["services"][0]["name"],
        "orders"
    );
    // The open watches still hear of it.
    assert_eq!(second.next(Duration::from_secs(5)).await.0, "change");

    // A closed watch gives its room back.
    drop(first);
    shared::testing::eventually(
        Duration::from_secs(10),
        "a watch is admitted once one has closed",
        async || {
            let response = registry
                .client
                .get(registry.url("/api/v1/watch"))
                .send()
                .await
                .ok()?;
            (response.status() == StatusCode::OK).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn bad_input_gets_a_problem_naming_the_field() {
    let registry = spawn().await;
    let post = |body: &'static str, content_type: &'static str, path: &'static str| {
        registry
            .client
            .post(registry.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let native = "/api/v1/services/orders/instances";
    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        (
            native,
            "application/json",
            r#"{"host": "127.0.0.1", "port": "#,
            400,
            "",
        ),
        (native, "application/json", r#"{"port": 80}"#, 422, "host"),
        (
            native,
            "application/json",
            r#"{"host": "not a host", "port": 80}"#,
            422,
            "host",
        ),
        (
            native,
            "application/json",
            r#"{"host": "127.0.0.1", "port": 70000}"#,
            422,
            "port",
        ),
        (
            native,
            "application/json",
            r#"{"host": "127.0.0.1", "port": 80, "leaseSeconds": 999999}"#,
            422,
            "leaseSeconds",
        ),
        (
            native,
            "application/json",
            r#"{"host": "127.0.0.1", "port": 80, "status": "ASLEEP"}"#,
            422,
            "status",
        ),
        (
            "/eureka/apps/ORDERS",
            "application/xml",
            "<instance><hostName>h</instance>",
            400,
            "",
        ),
        (
            "/eureka/apps/ORDERS",
            "application/xml",
            "<instance><app>ORDERS</app></instance>",
            422,
            "instance.hostName",
        ),
        (
            "/eureka/apps/ORDERS",
            "application/json",
            r#"{"instance": {"hostName": "h", "app": "OTHER"}}"#,
            422,
            "instance.app",
        ),
        (
            "/eureka/apps/ORDERS",
            "application/json",
            r#"{"instance": {"hostName": "h", "port": {"$": "http"}}}"#,
            422,
            "instance.port",
        ),
        (
            "/eureka/apps/ORDERS",
            "application/json",
            r#"{"instance": {"hostName": "h", "port": 80, "leaseInfo": {"durationInSecs": 0}}}"#,
            422,
            "instance.leaseInfo.durationInSecs",
        ),
        (
            "/eureka/apps/ORDERS",
            "application/json",
            r#"{"hostName": "h"}"#,
            422,
            "instance",
        ),
        ("/eureka/apps/ORDERS", "text/plain", "hostName=h", 415, ""),
        (
            "/eureka/apps/ORDERS",
            "application/json",
            // Stored, served back and replicated: bounded like the shared fields.
            Box::leak(
                format!(
                    r#"{{"instance": {{"hostName": "h", "port": 80, "homePageUrl": "http://h/{}"}}}}"#,
                    "x".repeat(3000)
                )
                .into_boxed_str(),
            ),
            422,
            "instance.homePageUrl",
        ),
    ];
    for (path, content_type, body, status, field) in cases {
        let response = post(body, content_type, path).await.expect("send");
        assert_eq!(response.status().as_u16(), status, "{path} {body}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{body}"
        );
        let problem: Value = response.json().await.expect("problem");
        if !field.is_empty() {
            let fields: Vec<&str> = problem["errors"]
                .as_array()
                .map(|e| e.iter().filter_map(|e| e["field"].as_str()).collect())
                .unwrap_or_default();
            assert!(fields.contains(&field), "{body}: {problem}");
        }
    }
}

#[tokio::test]
async fn eureka_discovery_negotiates_xml_by_default_and_json_on_request() {
    let registry = spawn().await;
    registry
        .register("orders", json!({ "instanceId": "o-1", "host": "127.0.0.1", "port": 8081, "metadata": {"zone": "a"} }))
        .await;
    let xml = registry
        .client
        .get(registry.url("/eureka/apps"))
        .send()
        .await
        .expect("apps");
    assert_eq!(xml.headers()["content-type"], "application/xml");
    let text = xml.text().await.expect("body");
    assert!(text.contains("<application><name>ORDERS</name>"), "{text}");
    assert!(
        text.contains("<port enabled=\"true\">8081</port>"),
        "{text}"
    );
    assert!(
        text.contains("<apps__hashcode>UP_1_</apps__hashcode>"),
        "{text}"
    );

    let json = registry.get("/eureka/apps").await;
    let app = &json["applications"]["application"][0];
    assert_eq!(app["name"], "ORDERS");
    assert_eq!(
        app["instance"][0]["port"],
        json!({"$": 8081, "@enabled": "true"})
    );
    assert_eq!(app["instance"][0]["metadata"]["zone"], "a");
    assert_eq!(
        app["instance"][0]["dataCenterInfo"]["@class"],
        "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"
    );
    assert_eq!(
        registry.get("/eureka/vips/orders").await["applications"]["application"][0]["name"],
        "ORDERS"
    );
    assert_eq!(
        registry.get("/eureka/instances/o-1").await["instance"]["app"],
        "ORDERS"
    );
    let delta = registry.get("/eureka/apps/delta").await;
    assert_eq!(
        delta["applications"]["application"][0]["instance"][0]["actionType"],
        "ADDED"
    );
}

#[tokio::test]
async fn the_dashboard_shows_the_live_table_with_no_outside_assets() {
    let registry = spawn().await;
    registry
        .register("orders", json!({ "instanceId": "o-dash", "host": "127.0.0.1", "port": 8088, "metadata": {"zone": "eu-1"} }))
        .await;
    let page = registry
        .client
        .get(registry.url("/"))
        .send()
        .await
        .expect("page");
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/html")
    );
    let html = page.text().await.expect("html");
    for expected in [
        "o-dash",
        "127.0.0.1:8088",
        "zone=eu-1",
        "s-UP",
        "lease left",
        "Self-preservation is off",
    ] {
        assert!(html.contains(expected), "{expected} missing");
    }
    assert!(html.contains("/api/v1/watch"), "follows the watch");
    for outside in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(!html.contains(outside), "loads {outside}");
    }
}

#[tokio::test]
async fn a_real_eureka_client_registers_renews_discovers_over_xml_and_cancels() {
    let python_path = std::env::var("STOREFRONT_PYTHONPATH").expect(
        "STOREFRONT_PYTHONPATH names py-eureka-client's folder; run the tests with `cargo xtask test`",
    );
    let registry = spawn().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py_eureka_round_trip.py");
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("python3")
            .arg(script)
            .arg(&registry.base)
            .arg(TOKEN)
            .env("PYTHONPATH", python_path)
            .output(),
    )
    .await
    .expect("the client finishes")
    .expect("python3 runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{said}");
    for step in [
        "REGISTERED",
        "DISCOVERED py-1 127.0.0.1 9999",
        "RENEWED",
        "DELTA",
        "CANCELLED",
    ] {
        assert!(said.contains(step), "{step} missing from:\n{said}");
    }
    let after = registry.get("/api/v1/services/py-service/instances").await;
    assert_eq!(after["instances"], json!([]), "cancelled on stop");
}

#[tokio::test]
async fn an_xml_registration_is_read_like_the_eureka_server_reads_it() {
    let registry = spawn().await;
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<instance>
  <instanceId>inv-1</instanceId><hostName>inventory.internal</hostName><app>INVENTORY</app>
  <ipAddr>10.1.2.3</ipAddr><status>STARTING</status>
  <port enabled="true">7001</port><securePort enabled="false">7002</securePort>
  <dataCenterInfo class="com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo"><name>MyOwn</name></dataCenterInfo>
  <leaseInfo><renewalIntervalInSecs>5</renewalIntervalInSecs><durationInSecs>20</durationInSecs></leaseInfo>
  <metadata><management.port>7001</management.port><zone>b</zone></metadata>
  <vipAddress>inventory</vipAddress><healthCheckUrl>http://inventory.internal:7001/health</healthCheckUrl>
</instance>"#;
    let response = registry
        .client
        .post(registry.url("/eureka/apps/INVENTORY"))
        .basic_auth("eureka", Some(TOKEN))
        .header("content-type", "application/xml")
        .body(xml)
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let shown = registry.get("/eureka/apps/inventory").await;
    let instance = &shown["application"]["instance"][0];
    assert_eq!(shown["application"]["name"], "INVENTORY");
    assert_eq!(instance["hostName"], "inventory.internal");
    assert_eq!(instance["ipAddr"], "10.1.2.3");
    assert_eq!(instance["status"], "STARTING");
    assert_eq!(instance["port"], json!({"$": 7001, "@enabled": "true"}));
    assert_eq!(instance["leaseInfo"]["durationInSecs"], 20);
    assert_eq!(instance["leaseInfo"]["renewalIntervalInSecs"], 5);
    assert_eq!(instance["metadata"]["management.port"], "7001");
    assert_eq!(
        instance["healthCheckUrl"],
        "http://inventory.internal:7001/health"
    );
    let native = registry
        .get("/api/v1/services/inventory/instances/inv-1")
        .await;
    assert_eq!(native["address"], "inventory.internal:7001");
    assert_eq!(native["leaseSeconds"], 20);
}

#[tokio::test]
async fn a_deeply_nested_xml_body_is_a_400_and_the_registry_lives_on() {
    let registry = spawn().await;
    // 200,000 levels (1.4 MB, under the body limit): a tree that deep overflowed the
    // stack of the worker that built it, which took the whole process down.
    let depth = 200_000;
    let body = format!(
        "<instance>{}{}</instance>",
        "<a>".repeat(depth),
        "</a>".repeat(depth)
    );
    let response = registry
        .client
        .post(registry.url("/eureka/apps/DEEP"))
        .basic_auth("eureka", Some(TOKEN))
        .header("content-type", "application/xml")
        .body(body)
        .send()
        .await
        .expect("an answer, not a dead registry");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.expect("problem");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("deeper than 32"), "{problem}");
    let health = registry
        .client
        .get(registry.url("/actuator/health"))
        .send()
        .await
        .expect("still serving");
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn prometheus_shows_registrations_renewals_and_instances_per_service() {
    let registry = spawn().await;
    registry
        .register(
            "orders",
            json!({ "instanceId": "o-m", "host": "127.0.0.1", "port": 8081 }),
        )
        .await;
    assert_eq!(registry.heartbeat("orders", "o-m").await, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = registry
            .client
            .get(registry.url("/actuator/prometheus"))
            .send()
            .await
            .expect("scrape")
            .text()
            .await
            .expect("text");
        let ready = [
            "registry_registrations_total",
            "registry_renewals_total",
            "registry_instances{service=\"orders\"} 1",
        ]
        .iter()
        .all(|m| text.contains(m));
        if ready {
            break;
        }
        // Gauges refresh once a second with the reaper; follow the registry's index.
        assert!(Instant::now() < deadline, "metrics missing:\n{text}");
        let _ = registry
            .get("/api/v1/services?index=1000000&wait=200ms")
            .await;
    }
}

/// With registry peers each node counts its own index. A blocking query naming another
/// node answers at once when this node's list differs from the one the client holds
/// (a failover misses nothing), and waits while it is the same (a balancer in front of
/// the peers costs no busy loop).
#[tokio::test]
async fn a_blocking_query_with_another_nodes_index_waits_on_the_list_it_holds() {
    let registry = spawn().await;
    assert_eq!(
        registry
            .register("orders", instance("10.0.0.1", 8080, 60))
            .await
            .status(),
        StatusCode::CREATED
    );
    let first = registry
        .client
        .get(registry.url("/api/v1/services/orders/instances"))
        .send()
        .await
        .expect("list");
    let header = |name: &str| first.headers()[name].to_str().expect("ascii").to_owned();
    let (node, digest) = (header("x-registry-node"), header("x-registry-digest"));
    assert_ne!(node, "elsewhere");
    let ask = async |query: &str| {
        let started = std::time::Instant::now();
        let response = registry
            .client
            .get(registry.url(&format!("/api/v1/services/orders/instances?{query}")))
            .send()
            .await
            .expect("blocking query");
        assert_eq!(response.status(), StatusCode::OK);
        let digest = response.headers()["x-registry-digest"]
            .to_str()
            .expect("ascii")
            .to_owned();
        (started.elapsed(), digest)
    };
    // Another node's index, far above this node's: this node cannot wait on it.
    let (took, _) = ask("index=999999&node=elsewhere&wait=30s").await;
    assert!(
        took < Duration::from_secs(10),
        "answered at once, not after {took:?}"
    );
    let (took, _) = ask("index=999999&node=elsewhere&digest=0&wait=30s").await;
    assert!(
        took < Duration::from_secs(10),
        "a different list: answered at once, not after {took:?}"
    );
    // The list the client holds is this node's: nothing to tell until it changes.
    let (took, same) = ask(&format!(
        "index=999999&node=elsewhere&digest={digest}&wait=1s"
    ))
    .await;
    assert!(
        took >= Duration::from_millis(900),
        "waited out the wait, not {took:?}"
    );
    assert_eq!(same, digest, "the same list");
    // This node's own index: the usual blocking query.
    let (took, _) = ask(&format!("index=999999&node={node}&digest=0&wait=1s")).await;
    assert!(
        took >= Duration::from_millis(900),
        "waited for the index, not {took:?}"
    );
}

/// What a peer sends: only the operator's token may, a batch is applied once however
/// often it is retried, and what it applies is visible like any registration.
#[tokio::test]
async fn a_replicated_batch_needs_the_operator_token_and_is_applied_once() {
    let registry = spawn().await;
    let now = shared::now_ms();
    let batch = json!({
        "node": "peer-b",
        "stream": 0,
        "seq": 1,
        "actions": [{
            "op": "upsert",
            "cause": "registered",
            "at": now,
            "record": {
                "service": "orders",
                "instanceId": "orders-b-1",
                "host": "10.0.0.7",
                "port": 8080,
                "status": "UP",
                "overrideStatus": null,
                "leaseSeconds": 30,
                "healthUrl": null,
                "metadata": {"zone": "b"},
                "registeredAt": now,
                "updatedAt": now,
                "dirty": now * 1024,
                "expiresAt": now + 30_000,
                "lastRenewal": now,
            },
        }],
    });
    let send = async |credential: &str| {
        let response = registry
            .client
            .post(registry.url("/api/v1/replication"))
            .bearer_auth(credential)
            .json(&batch)
            .send()
            .await
            .expect("replicate");
        let status = response.status();
        (status, response.json::<Value>().await.unwrap_or_default())
    };
    let orders = shared::registry::service_credential(TOKEN, "orders");
    assert_eq!(
        send(&orders).await.0,
        StatusCode::FORBIDDEN,
        "a service may not replicate"
    );
    let (status, first) = send(TOKEN).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        first,
        json!({"duplicate": false, "outcomes": ["applied"], "newer": []})
    );
    let index = registry.get("/api/v1/state").await["index"].clone();
    // The answer was lost on the way back, so the peer sends the batch again.
    let (_, again) = send(TOKEN).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        registry.get("/api/v1/state").await["index"],
        index,
        "nothing changed twice"
    );
    let listed = registry
        .get("/api/v1/services/orders/instances/orders-b-1")
        .await;
    assert_eq!(listed["metadata"]["zone"], "b", "{listed}");
    assert_eq!(
        listed["leaseExpiresAt"],
        json!(now + 30_000),
        "the peer's lease end, exactly"
    );
}

/// A node still copying the table from its peers answers 503 to reads and writes. Its
/// readiness probe (and health) says so, naming why, so an orchestrator sends it no
/// traffic; its liveness probe stays UP. Once it has started (here: its only peer
/// answers that it is starting too, a cold start of the group), it is ready.
#[tokio::test]
async fn a_node_copying_its_table_is_not_ready_until_it_has_started() {
    // The peer's port is held but not served yet: the node's request for the table
    // waits there, so the node stays in its start-up copy.
    let peer = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let registry = spawn_with(Settings {
        auth: AuthSettings {
            token: Some(TOKEN.into()),
            protect_reads: false,
            ..Default::default()
        },
        peers: registry::peers::PeerSettings {
            urls: format!("http://{}", peer.local_addr().expect("addr")),
            sync_timeout_ms: 600_000,
            ..Default::default()
        },
        ..Settings::default()
    })
    .await;
    let get = async |path: &str| {
        let response = registry
            .client
            .get(registry.url(path))
            .send()
            .await
            .expect("get");
        let status = response.status();
        (status, response.json::<Value>().await.expect("json"))
    };

    for path in ["/actuator/health/readiness", "/actuator/health"] {
        let (status, body) = get(path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert_eq!(body["status"], "DOWN", "{path}: {body}");
        assert_eq!(body["components"]["startup"]["status"], "DOWN", "{body}");
        assert!(
            body["components"]["startup"]["details"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("copying the table")),
            "{body}"
        );
    }
    let (status, body) = get("/actuator/health/liveness").await;
    assert_eq!(status, StatusCode::OK, "liveness checks nothing: {body}");
    let (status, _) = get("/api/v1/services").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "it serves nothing yet"
    );

    // The peer answers now, as a peer that is starting too: nobody holds a table.
    let starting_too = axum::Router::new().route(
        "/api/v1/replication/table",
        axum::routing::get(|| async { StatusCode::SERVICE_UNAVAILABLE }),
    );
    tokio::spawn(async move { axum::serve(peer, starting_too).await });
    let body = shared::testing::eventually(
        Duration::from_secs(20),
        "the node is ready once its peer says it is starting too",
        async || {
            let (status, body) = get("/actuator/health/readiness").await;
            (status == StatusCode::OK).then_some(body)
        },
    )
    .await;
    assert_eq!(body["components"]["startup"]["status"], "UP", "{body}");
    let (status, _) = get("/api/v1/services").await;
    assert_eq!(status, StatusCode::OK, "and it serves");
}
