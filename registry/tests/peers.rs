//! Three registry peers, each a real `registry` process given the same list of all
//! three, and the gateway (in-process) following all three, with traffic through it.
//! One peer is killed with SIGKILL; then:
//!
//! - no request through the gateway fails;
//! - the instances that registered with the killed peer stay registered (their
//!   heartbeats move to another peer, which knows them by replication);
//! - an instance registered at another peer afterwards is routed to within a second;
//! - an instance that stops heartbeating is gone from every peer within a second of
//!   its lease's end;
//! - the killed peer, started again, copies the table and converges with the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::{
    config::HttpSettings,
    registry::{InstanceRegistration, Membership, RegistryClient, RegistrySettings},
    testing::eventually,
};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "peers-test-registry-token";

const ROUTES: &str = r#"
routes:
  - id: echo
    uri: lb://echo
    predicates: ["Path=/echo/**"]
    filters: [StripPrefix=1]
"#;

/// A registry peer as a child process, killed when dropped.
struct Peer {
    port: u16,
    child: Option<tokio::process::Child>,
    log: PathBuf,
}

impl Peer {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self, peers: &str) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_registry"))
            .env_remove("REGISTRY_CONFIG")
            .env("REGISTRY_HTTP__PORT", self.port.to_string())
            .env("REGISTRY_TOKEN", TOKEN)
            .env("REGISTRY_PEERS__URLS", peers)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("the registry binary runs");
        self.child = Some(child);
    }

    /// SIGKILL: no deregistration, no goodbye to its peers.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL");
            let _ = child.wait().await;
        }
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    let response = client.get(url).send().await.ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    response.json().await.ok()
}

async fn is_ready(client: &reqwest::Client, peer: &str) -> bool {
    get_json(client, &format!("{peer}/api/v1/state"))
        .await
        .is_some_and(|s| s["ready"] == true)
}

/// The instance ids of `service` that `peer` lists, or `None` when it does not answer.
async fn listed(client: &reqwest::Client, peer: &str, service: &str) -> Option<BTreeSet<String>> {
    let body = get_json(
        client,
        &format!("{peer}/api/v1/services/{service}/instances"),
    )
    .await?;
    Some(
        body["instances"]
            .as_array()?
            .iter()
            .filter_map(|i| i["instanceId"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// What must agree between peers: each instance's identity, statuses and times that
/// replication carries exactly.
async fn table(client: &reqwest::Client, peer: &str) -> Option<BTreeMap<String, Value>> {
    let body = get_json(client, &format!("{peer}/api/v1/instances")).await?;
    Some(
        body["instances"]
            .as_array()?
            .iter()
            .map(|i| {
                (
                    format!("{}/{}", i["service"], i["instanceId"]),
                    json!([
                        i["address"],
                        i["status"],
                        i["overrideStatus"],
                        i["registeredAt"],
                        i["leaseExpiresAt"],
                        i["metadata"],
                    ]),
                )
            })
            .collect(),
    )
}

/// An upstream that answers every request with its name.
async fn echo(name: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app =
        axum::Router::new().fallback(move || async move { axum::Json(json!({ "name": name })) });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn client_settings(urls: &str) -> RegistrySettings {
    RegistrySettings {
        urls: urls.to_owned(),
        token: Some(TOKEN.into()),
        lease_seconds: 3,
        drain_ms: 0,
        ..RegistrySettings::default()
    }
}

fn registration(
    name: &str,
    addr: std::net::SocketAddr,
    settings: &RegistrySettings,
) -> InstanceRegistration {
    InstanceRegistration {
        instance_id: name.to_owned(),
        ..InstanceRegistration::for_bound("echo", addr, settings)
    }
}

fn gateway_settings(urls: &str, routes: &Path) -> gateway::Settings {
    use gateway::auth::{GatewayAuthSettings, UserSettings, hash_password};
    gateway::Settings {
        http: HttpSettings::local(0),
        registry: RegistrySettings {
            enabled: true,
            ..client_settings(urls)
        },
        routes_file: Some(routes.to_path_buf()),
        auth: GatewayAuthSettings {
            signing_key: Some(shared::auth::TokenSigner::generate_seed()),
            users: vec![UserSettings {
                username: "alice".into(),
                password_hash: hash_password("alice-pw").expect("hash"),
                roles: vec!["customer".into()],
                id: Some("user-alice".into()),
            }],
            ..GatewayAuthSettings::default()
        },
        ..gateway::Settings::default()
    }
}

/// Requests through the gateway, one after another, until stopped: how many failed,
/// and when each upstream first answered.
#[derive(Default)]
struct Traffic {
    sent: AtomicU64,
    failed: Mutex<Vec<String>>,
    first_seen: Mutex<BTreeMap<String, Instant>>,
    stop: AtomicBool,
}

impl Traffic {
    fn seen(&self, name: &str) -> Option<Instant> {
        self.first_seen.lock().expect("lock").get(name).copied()
    }
}

async fn drive(traffic: Arc<Traffic>, gateway: String, bearer: String) {
    let client = reqwest::Client::new();
    while !traffic.stop.load(Ordering::Relaxed) {
        let answer = client
            .get(format!("{gateway}/echo/hello"))
            .header("authorization", &bearer)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        traffic.sent.fetch_add(1, Ordering::Relaxed);
        match answer {
            Ok(response) if response.status() == StatusCode::OK => {
                if let Ok(body) = response.json::<Value>().await
                    && let Some(name) = body["name"].as_str()
                {
                    traffic
                        .first_seen
                        .lock()
                        .expect("lock")
                        .entry(name.to_owned())
                        .or_insert_with(Instant::now);
                }
            }
            Ok(response) => {
                let status = response.status();
                let body = response.text().await.unwrap_or_default();
                traffic
                    .failed
                    .lock()
                    .expect("lock")
                    .push(format!("{status} {body}"));
            }
            Err(e) => traffic.failed.lock().expect("lock").push(e.to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_lose_one_without_losing_a_route() {
    let dir = tempfile::tempdir().expect("temp dir");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    // Held together while chosen, so no two are the same.
    let held: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let mut peers: Vec<Peer> = held
        .iter()
        .enumerate()
        .map(|(i, listener)| Peer {
            port: listener.local_addr().expect("addr").port(),
            child: None,
            log: dir.path().join(format!("registry-{i}.log")),
        })
        .collect();
    drop(held);
    let all = peers.iter().map(Peer::url).collect::<Vec<_>>().join(",");
    for peer in &mut peers {
        peer.start(&all);
    }
    let urls: Vec<String> = peers.iter().map(Peer::url).collect();
    for url in &urls {
        eventually(Duration::from_secs(30), "every peer is ready", async || {
            is_ready(&client, url).await.then_some(())
        })
        .await;
    }
    // Each found itself in the list, and reaches the two others.
    for url in &urls {
        eventually(
            Duration::from_secs(10),
            "each peer knows itself and reaches the others",
            async || {
                let state = get_json(&client, &format!("{url}/api/v1/state")).await?;
                let states: Vec<String> = state["peers"]
                    .as_array()?
                    .iter()
                    .filter_map(|p| p["state"].as_str().map(str::to_owned))
                    .collect();
                let selves = states.iter().filter(|s| *s == "self").count();
                let up = states.iter().filter(|s| *s == "up").count();
                (selves == 1 && up == 2).then_some(())
            },
        )
        .await;
    }

    // Two instances keep themselves registered, first with peer 0, the one that dies.
    let stop_members = CancellationToken::new();
    let _stop_members = stop_members.clone().drop_guard();
    let settings = client_settings(&all);
    let mut members = Vec::new();
    for name in ["echo-a", "echo-b"] {
        let addr = echo(name).await;
        let mut member = Membership::start(
            RegistryClient::new(&settings).expect("client"),
            registration(name, addr, &settings),
            &settings,
            stop_members.clone(),
        );
        member.registered().await;
        members.push(member);
    }
    for url in &urls {
        eventually(
            Duration::from_secs(10),
            "every peer lists both, by replication",
            async || {
                listed(&client, url, "echo")
                    .await
                    .filter(|ids| ids.len() == 2)
            },
        )
        .await;
    }

    // The gateway follows all three peers, peer 0 first.
    let routes = dir.path().join("routes.yaml");
    std::fs::write(&routes, ROUTES).expect("routes");
    let app = gateway::Application::build(gateway_settings(&all, &routes))
        .await
        .expect("gateway");
    let gateway = format!("http://{}", app.local_addr());
    let stop_gateway = CancellationToken::new();
    let _stop_gateway = stop_gateway.clone().drop_guard();
    tokio::spawn(app.run_until_stopped(stop_gateway.clone()));
    let token: Value = client
        .post(format!("{gateway}/auth/token"))
        .json(&json!({"username": "alice", "password": "alice-pw"}))
        .send()
        .await
        .expect("login")
        .json()
        .await
        .expect("token");
    let bearer = format!("Bearer {}", token["access_token"].as_str().expect("token"));
    let traffic = Arc::new(Traffic::default());
    let driver = tokio::spawn(drive(traffic.clone(), gateway.clone(), bearer));
    eventually(
        Duration::from_secs(15),
        "the gateway routes to both instances",
        async || {
            (traffic.seen("echo-a").is_some() && traffic.seen("echo-b").is_some()).then_some(())
        },
    )
    .await;
    let before_kill = traffic.sent.load(Ordering::Relaxed);

    peers[0].kill().await;

    // An instance registered at another peer afterwards is routed to within a second.
    let settings_1 = client_settings(&urls[1]);
    let addr_c = echo("echo-c").await;
    let mut member_c = Membership::start(
        RegistryClient::new(&settings_1).expect("client"),
        registration("echo-c", addr_c, &settings_1),
        &settings_1,
        stop_members.clone(),
    );
    member_c.registered().await;
    let registered_c = Instant::now();
    let seen_c = eventually(
        Duration::from_secs(10),
        "the gateway routes to echo-c",
        async || traffic.seen("echo-c"),
    )
    .await;
    let took = seen_c.saturating_duration_since(registered_c);
    assert!(
        took < Duration::from_secs(1),
        "echo-c was first routed to {took:?} after it registered"
    );

    // An instance that stops heartbeating is gone from every live peer within a second
    // of its lease's end.
    let settings_2 = client_settings(&urls[2]);
    let addr_d = echo("echo-d").await;
    RegistryClient::new(&settings_2)
        .expect("client")
        .register(&registration("echo-d", addr_d, &settings_2), 2)
        .await
        .expect("register echo-d");
    let record = get_json(
        &client,
        &format!("{}/api/v1/services/echo/instances/echo-d", urls[2]),
    )
    .await
    .expect("echo-d at peer 2");
    let lease_end = record["leaseExpiresAt"].as_u64().expect("lease end");
    eventually(Duration::from_secs(2), "peer 1 lists echo-d", async || {
        listed(&client, &urls[1], "echo")
            .await
            .filter(|ids| ids.contains("echo-d"))
    })
    .await;
    for url in &urls[1..] {
        eventually(
            Duration::from_secs(10),
            "echo-d leaves every live peer",
            async || {
                listed(&client, url, "echo")
                    .await
                    .filter(|ids| !ids.contains("echo-d"))
            },
        )
        .await;
        let gone = shared::now_ms();
        assert!(
            gone < lease_end + 1000,
            "{url} still listed echo-d {} ms after its lease ended",
            gone.saturating_sub(lease_end)
        );
    }

    // The instances that registered with the dead peer are still registered well past
    // their 3 s lease: their heartbeats went to another peer, which knew them.
    let past_lease = Instant::now() + Duration::from_secs(4);
    while Instant::now() < past_lease {
        for url in &urls[1..] {
            let ids = listed(&client, url, "echo").await.expect("listing");
            assert!(
                ids.contains("echo-a") && ids.contains("echo-b"),
                "{url} lost an instance of the dead peer: {ids:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The killed peer comes back and converges to the same table.
    peers[0].start(&all);
    eventually(
        Duration::from_secs(30),
        "the restarted peer is ready",
        async || is_ready(&client, &urls[0]).await.then_some(()),
    )
    .await;
    let converged = eventually(
        Duration::from_secs(10),
        "every peer holds the same table",
        async || {
            let mut tables = Vec::new();
            for url in &urls {
                tables.push(table(&client, url).await?);
            }
            (tables[0] == tables[1] && tables[1] == tables[2]).then(|| tables.remove(0))
        },
    )
    .await;
    for id in ["echo-a", "echo-b", "echo-c"] {
        assert!(
            converged.keys().any(|k| k.ends_with(&format!("\"{id}\""))),
            "{id} missing from {converged:?}"
        );
    }
    assert!(
        !converged.keys().any(|k| k.ends_with("\"echo-d\"")),
        "the expired echo-d came back: {converged:?}"
    );

    traffic.stop.store(true, Ordering::Relaxed);
    driver.await.expect("traffic");
    let sent = traffic.sent.load(Ordering::Relaxed);
    let failed = traffic.failed.lock().expect("lock").clone();
    assert!(
        sent > before_kill + 20,
        "traffic kept flowing after the kill ({before_kill} then {sent})"
    );
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {:?}\npeer 0 said:\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        peers[0].said()
    );
    stop_members.cancel();
    for member in members {
        member.left().await;
    }
    member_c.left().await;
}
