//! A real Spring Boot service with Spring Cloud Netflix's Eureka client
//! (`interop/eureka-client`, Spring Boot 4.0 and Spring Cloud 2025.1), configured only
//! through its usual properties, against our registry and gateway: it registers and
//! renews; the gateway routes to it through an `lb://` route; an operator's
//! `OUT_OF_SERVICE` override takes it out of rotation and removing the override brings
//! it back; its own `DiscoveryClient` lists our services, including one registered
//! after its first fetch (a delta); and a graceful stop deregisters it, after which
//! the gateway no longer routes to it.

mod support;

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::{
    registry::{InstanceRegistration, RegistryClient},
    testing::eventually,
};
use support::{REGISTRY_TOKEN, registry, registry_settings};
use tokio_util::sync::CancellationToken;

const ROUTES: &str = r#"
routes:
  - id: spring-demo
    uri: lb://spring-demo
    predicates: ["Path=/spring/**"]
    filters: [StripPrefix=1]
"#;

/// The Spring app as a child process, killed if the test ends early.
struct SpringApp {
    child: tokio::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl SpringApp {
    fn start(registry: SocketAddr, dir: &std::path::Path) -> SpringApp {
        Self::start_with(
            &format!("http://eureka:{REGISTRY_TOKEN}@{registry}/eureka/"),
            dir,
        )
    }

    /// With `default_zone` as its `eureka.client.service-url.defaultZone`: one URL, or
    /// several peers separated by commas.
    fn start_with(default_zone: &str, dir: &std::path::Path) -> SpringApp {
        let jar = std::env::var("STOREFRONT_SPRING_EUREKA_CLIENT").expect(
            "STOREFRONT_SPRING_EUREKA_CLIENT names the Spring client's jar; run the tests with `cargo xtask test`",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = dir.join("spring.log");
        let out = std::fs::File::create(&log).expect("log");
        // Only the properties a Spring user sets: the registry's URL with its
        // credentials, the application's name and port, and the intervals a team that
        // wants fast failover shortens (Eureka's defaults are 30 s and 90 s).
        let child = tokio::process::Command::new("java")
            .args(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-jar", &jar])
            .arg(format!("--server.port={port}"))
            .arg("--spring.application.name=spring-demo")
            .arg(format!(
                "--eureka.client.service-url.defaultZone={default_zone}"
            ))
            .arg("--eureka.instance.hostname=127.0.0.1")
            .arg("--eureka.instance.lease-renewal-interval-in-seconds=1")
            .arg("--eureka.instance.lease-expiration-duration-in-seconds=5")
            .arg("--eureka.client.registry-fetch-interval-seconds=1")
            .arg("--eureka.client.instance-info-replication-interval-seconds=1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("java runs the Spring app");
        SpringApp { child, port, log }
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn get(&self, client: &reqwest::Client, path: &str) -> Option<Value> {
        let response = client
            .get(format!("http://127.0.0.1:{}{path}", self.port))
            .send()
            .await
            .ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        response.json().await.ok()
    }
}

/// The app's instance as our Eureka API lists it (JSON), if it is listed.
async fn eureka_instance(client: &reqwest::Client, registry: SocketAddr) -> Option<Value> {
    let response = client
        .get(format!("http://{registry}/eureka/apps/SPRING-DEMO"))
        .header("accept", "application/json")
        .send()
        .await
        .ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["application"]["instance"].get(0).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spring_boot_eureka_client_works_with_our_registry_and_gateway_unchanged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (registry, _stop_registry) = registry().await;
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, ROUTES).expect("routes");
    let (gateway, _stop_gateway) =
        support::start_gateway(support::gateway_settings(registry, &routes_file)).await;
    let bearer = support::alice_bearer(&gateway).await;
    let client = reqwest::Client::new();
    let through_gateway = async |path: &str| -> (StatusCode, Option<Value>) {
        let response = client
            .get(format!("{gateway}{path}"))
            .header("authorization", &bearer)
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status();
        (status, response.json().await.ok())
    };

    let mut spring = SpringApp::start(registry, dir.path());

    // It registers, UP, at the address it serves on.
    let instance = eventually(
        Duration::from_secs(120),
        "the Spring app registers UP",
        async || {
            eureka_instance(&client, registry)
                .await
                .filter(|i| i["status"] == "UP")
        },
    )
    .await;
    assert_eq!(instance["hostName"], "127.0.0.1", "{instance}");
    assert_eq!(instance["port"]["$"], json!(spring.port), "{instance}");
    let id = instance["instanceId"]
        .as_str()
        .expect("an instance id")
        .to_owned();

    // It renews its lease.
    let first_renewal = instance["leaseInfo"]["lastRenewalTimestamp"]
        .as_u64()
        .expect("a renewal time");
    eventually(
        Duration::from_secs(15),
        "the Spring app renews",
        async || {
            eureka_instance(&client, registry)
                .await
                .filter(|i| i["leaseInfo"]["lastRenewalTimestamp"].as_u64() > Some(first_renewal))
        },
    )
    .await;

    // The gateway routes to it through `lb://spring-demo`.
    let (status, body) = eventually(
        Duration::from_secs(15),
        "the gateway routes to it",
        async || {
            let (status, body) = through_gateway("/spring/hello").await;
            (status == StatusCode::OK).then_some((status, body))
        },
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.expect("json")["app"], "spring-demo");

    // Its own DiscoveryClient lists our services, including one registered after its
    // first fetch, which reaches it as a delta.
    let inventory = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let inventory_addr = inventory.local_addr().expect("addr");
    let settings = registry_settings(registry);
    let ours = RegistryClient::new(&settings).expect("registry client");
    let inventory_instance =
        InstanceRegistration::for_bound("inventory-service", inventory_addr, &settings);
    ours.register(&inventory_instance, 60)
        .await
        .expect("register inventory-service");
    let seen = eventually(
        Duration::from_secs(20),
        "Spring's DiscoveryClient lists inventory-service",
        async || {
            spring.get(&client, "/services").await.filter(|s| {
                s.as_array()
                    .is_some_and(|a| a.contains(&json!("inventory-service")))
            })
        },
    )
    .await;
    assert!(
        seen.as_array()
            .is_some_and(|a| a.contains(&json!("spring-demo"))),
        "{seen}"
    );
    let instances = spring
        .get(&client, "/services/inventory-service")
        .await
        .expect("instances");
    assert_eq!(
        instances,
        json!([format!("http://{inventory_addr}")]),
        "the address we registered"
    );

    // One of our services drains before it stops (a status Netflix's client does not
    // know, and whose parse failure would blind it to the whole registry): Spring
    // sees it leave the rotation, and keeps seeing what changes after it.
    ours.set_status(
        "inventory-service",
        &inventory_instance.instance_id,
        "DRAINING",
    )
    .await
    .expect("drain inventory-service");
    let catalog = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    ours.register(
        &InstanceRegistration::for_bound(
            "catalog-service",
            catalog.local_addr().expect("addr"),
            &settings,
        ),
        60,
    )
    .await
    .expect("register catalog-service");
    eventually(
        Duration::from_secs(20),
        "Spring lists catalog-service and no draining inventory-service instance",
        async || {
            let services = spring.get(&client, "/services").await?;
            let draining_gone = spring
                .get(&client, "/services/inventory-service")
                .await
                .is_some_and(|i| i == json!([]));
            (services.as_array()?.contains(&json!("catalog-service")) && draining_gone)
                .then_some(())
        },
    )
    .await;

    // An operator takes it out of service: the gateway stops routing to it.
    let override_url = format!("http://{registry}/eureka/apps/SPRING-DEMO/{id}/status");
    let set = client
        .put(format!("{override_url}?value=OUT_OF_SERVICE"))
        .bearer_auth(REGISTRY_TOKEN)
        .send()
        .await
        .expect("override");
    assert_eq!(set.status(), StatusCode::OK);
    eventually(
        Duration::from_secs(10),
        "the gateway stops routing to it",
        async || {
            (through_gateway("/spring/hello").await.0 == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(())
        },
    )
    .await;
    // Its own heartbeats (status=UP) do not undo the override.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        through_gateway("/spring/hello").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "still out of rotation after several of its heartbeats"
    );
    let removed = client
        .delete(&override_url)
        .bearer_auth(REGISTRY_TOKEN)
        .send()
        .await
        .expect("remove override");
    assert_eq!(removed.status(), StatusCode::OK);
    eventually(
        Duration::from_secs(10),
        "the gateway routes to it again",
        async || (through_gateway("/spring/hello").await.0 == StatusCode::OK).then_some(()),
    )
    .await;

    // A graceful stop (SIGTERM) deregisters it, and the gateway stops routing to it.
    let pid = spring.child.id().expect("running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(60), spring.child.wait())
        .await
        .expect("it stops within a minute")
        .expect("exit status");
    let stopped = Instant::now();
    eventually(
        Duration::from_secs(5),
        "the registry no longer lists it",
        async || {
            eureka_instance(&client, registry)
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "the gateway no longer routes to it",
        async || {
            (through_gateway("/spring/hello").await.0 == StatusCode::SERVICE_UNAVAILABLE)
                .then_some(())
        },
    )
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "gone at once, not after a lease expired (exit {status}):\n{}",
        spring.said()
    );
}

/// Two registry peers in-process, each given both URLs; stopped when its token is
/// cancelled.
async fn two_peers() -> Vec<(SocketAddr, CancellationToken)> {
    // Held together while chosen, so the two are not the same.
    let held: Vec<std::net::TcpListener> = (0..2)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect();
    drop(held);
    let urls = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut peers = Vec::new();
    for port in ports {
        let settings = registry::Settings {
            http: shared::config::HttpSettings::local(port),
            auth: registry::auth::AuthSettings {
                token: Some(REGISTRY_TOKEN.into()),
                ..Default::default()
            },
            peers: registry::peers::PeerSettings {
                urls: urls.clone(),
                ..Default::default()
            },
            ..registry::Settings::default()
        };
        let app = registry::Application::build(settings)
            .await
            .expect("registry peer");
        let addr = app.local_addr();
        let stop = CancellationToken::new();
        tokio::spawn(app.run_until_stopped(stop.clone()));
        peers.push((addr, stop));
    }
    peers
}

/// The client heartbeats this peer received itself in the last minute (replicated
/// ones are not counted).
async fn own_renewals(client: &reqwest::Client, peer: SocketAddr) -> u64 {
    let state: Value = client
        .get(format!("http://{peer}/api/v1/state"))
        .send()
        .await
        .expect("state")
        .json()
        .await
        .expect("state json");
    state["renewalsLastMinute"].as_u64().unwrap_or(0)
}

/// A Spring client given two peers in `defaultZone`, as Eureka users list theirs:
/// stopping the peer it talks to costs it nothing: its heartbeats and fetches move to
/// the other peer, which already lists it, and the gateway keeps routing to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spring_boot_eureka_client_with_two_peers_survives_losing_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut peers = two_peers().await;
    let zone = peers
        .iter()
        .map(|(addr, _)| format!("http://eureka:{REGISTRY_TOKEN}@{addr}/eureka/"))
        .collect::<Vec<_>>()
        .join(",");
    let routes_file = dir.path().join("routes.yaml");
    std::fs::write(&routes_file, ROUTES).expect("routes");
    let mut settings = support::gateway_settings(peers[0].0, &routes_file);
    settings.registry.urls = peers
        .iter()
        .map(|(addr, _)| format!("http://{addr}"))
        .collect::<Vec<_>>()
        .join(",");
    let (gateway, _stop_gateway) = support::start_gateway(settings).await;
    let bearer = support::alice_bearer(&gateway).await;
    let client = reqwest::Client::new();
    let routed = async || -> bool {
        client
            .get(format!("{gateway}/spring/hello"))
            .header("authorization", &bearer)
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    };

    let spring = SpringApp::start_with(&zone, dir.path());
    for (peer, _) in &peers {
        eventually(
            Duration::from_secs(120),
            "both peers list the Spring app UP",
            async || {
                eureka_instance(&client, *peer)
                    .await
                    .filter(|i| i["status"] == "UP")
            },
        )
        .await;
    }
    eventually(
        Duration::from_secs(15),
        "the gateway routes to it",
        async || routed().await.then_some(()),
    )
    .await;

    // The peer it heartbeats is the one whose own renewal count grows.
    let before: Vec<u64> =
        futures::future::join_all(peers.iter().map(|(peer, _)| own_renewals(&client, *peer))).await;
    let talker = eventually(
        Duration::from_secs(15),
        "the Spring app heartbeats one of the peers",
        async || {
            for (i, (peer, _)) in peers.iter().enumerate() {
                if own_renewals(&client, *peer).await > before[i] + 1 {
                    return Some(i);
                }
            }
            None
        },
    )
    .await;
    let (stopped, stop) = peers.remove(talker);
    let (survivor, _keep) = peers.remove(0);
    stop.cancel();
    eventually(
        Duration::from_secs(10),
        "the stopped peer no longer answers",
        async || {
            client
                .get(format!("http://{stopped}/api/v1/state"))
                .send()
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;

    // Its heartbeats move to the survivor, which knew it by replication.
    let at_survivor = own_renewals(&client, survivor).await;
    eventually(
        Duration::from_secs(30),
        "the Spring app heartbeats the surviving peer",
        async || (own_renewals(&client, survivor).await > at_survivor + 1).then_some(()),
    )
    .await;
    assert!(routed().await, "the gateway still routes to it");

    // Its DiscoveryClient fetches from the survivor now: it sees what registers there.
    let inventory = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let settings = registry_settings(survivor);
    RegistryClient::new(&settings)
        .expect("registry client")
        .register(
            &InstanceRegistration::for_bound(
                "inventory-service",
                inventory.local_addr().expect("addr"),
                &settings,
            ),
            60,
        )
        .await
        .expect("register inventory-service");
    eventually(
        Duration::from_secs(30),
        "Spring's DiscoveryClient lists inventory-service, registered at the survivor",
        async || {
            spring.get(&client, "/services").await.filter(|s| {
                s.as_array()
                    .is_some_and(|a| a.contains(&json!("inventory-service")))
            })
        },
    )
    .await;
    // Well past its 5 s lease, it is still listed and routed to.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        eureka_instance(&client, survivor)
            .await
            .is_some_and(|i| i["status"] == "UP"),
        "the survivor still lists it:\n{}",
        spring.said()
    );
    assert!(routed().await, "the gateway still routes to it");
}
