//! The registry client against the real registry, started in-process.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use shared::{
    config::HttpSettings,
    registry::{Discovery, InstanceRegistration, Membership, RegistryClient, RegistrySettings},
};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "client-test-token";

/// A registry on `port` (0: any); returns its address and the token that stops it.
async fn registry(port: u16) -> (SocketAddr, CancellationToken) {
    registry_with(port, |_| {}).await
}

/// The same, with settings of the test's own.
async fn registry_with(
    port: u16,
    edit: impl FnOnce(&mut registry::Settings),
) -> (SocketAddr, CancellationToken) {
    let mut settings = registry::Settings {
        http: HttpSettings::local(port),
        auth: registry::auth::AuthSettings {
            token: Some(TOKEN.into()),
            protect_reads: false,
            ..Default::default()
        },
        ..registry::Settings::default()
    };
    edit(&mut settings);
    let app = registry::Application::build(settings)
        .await
        .expect("registry");
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until_stopped(stop.clone()));
    let stopped = stop.clone();
    tokio::spawn(async move {
        stopped.cancelled().await;
        let _ = task.await;
    });
    (addr, stop)
}

fn settings(urls: String) -> RegistrySettings {
    RegistrySettings {
        urls,
        token: Some(TOKEN.into()),
        lease_seconds: 1,
        drain_ms: 300,
        ..RegistrySettings::default()
    }
}

async fn listing(addr: SocketAddr, service: &str) -> Value {
    reqwest::get(format!("http://{addr}/api/v1/services/{service}/instances"))
        .await
        .expect("list")
        .json()
        .await
        .expect("json")
}

/// Follows the registry's changes for `service` until `done` holds.
async fn wait_until(addr: SocketAddr, service: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = listing(addr, service).await;
        if done(&now) {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {now}"
        );
        let index = now["index"].as_u64().unwrap_or(0);
        let _ = reqwest::get(format!(
            "http://{addr}/api/v1/services/{service}/instances?index={index}&wait=1s"
        ))
        .await;
    }
}

#[tokio::test]
async fn a_member_registers_its_bound_address_outlives_its_lease_then_drains_and_leaves() {
    let (addr, _stop) = registry(0).await;
    let s = settings(format!("http://{addr}"));
    let bound: SocketAddr = "127.0.0.1:45678".parse().expect("addr");
    let registration = InstanceRegistration::for_bound("orders", bound, &s);
    let shutdown = CancellationToken::new();
    let mut member = Membership::start(
        RegistryClient::new(&s).expect("registry client"),
        registration,
        &s,
        shutdown.clone(),
    );
    member.registered().await;
    let listed = listing(addr, "orders").await;
    assert_eq!(listed["instances"][0]["address"], "127.0.0.1:45678");
    assert_eq!(
        listed["instances"][0]["healthUrl"],
        "http://127.0.0.1:45678/actuator/health"
    );

    // Well past its one-second lease, the heartbeats keep it registered.
    let registered_at = listed["instances"][0]["registeredAt"].as_u64().unwrap_or(0);
    wait_until(addr, "orders", |v| {
        v["instances"][0]["lastRenewalAt"].as_u64() > Some(registered_at + 1500)
    })
    .await;

    shutdown.cancel();
    wait_until(addr, "orders", |v| {
        v["instances"][0]["status"] == "DRAINING"
    })
    .await;
    member.left().await;
    assert_eq!(
        listing(addr, "orders").await["instances"],
        serde_json::json!([])
    );
}

#[tokio::test]
async fn a_member_registers_again_after_the_registry_restarts_empty() {
    let (addr, stop) = registry(0).await;
    let s = settings(format!("http://{addr}"));
    let registration =
        InstanceRegistration::for_bound("payments", "127.0.0.1:45679".parse().expect("addr"), &s);
    let shutdown = CancellationToken::new();
    let mut member = Membership::start(
        RegistryClient::new(&s).expect("registry client"),
        registration,
        &s,
        shutdown.clone(),
    );
    member.registered().await;

    stop.cancel();
    // The same address, no memory of anyone: the next heartbeat gets 404.
    let (again, _stop_again) = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(probe) => {
                drop(probe);
                break registry(addr.port()).await;
            }
            Err(_) => tokio::task::yield_now().await,
        }
    };
    let listed = wait_until(again, "payments", |v| {
        v["instances"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(listed["instances"][0]["address"], "127.0.0.1:45679");
    shutdown.cancel();
    member.left().await;
}

#[tokio::test]
async fn the_client_fails_over_to_the_next_registry_url() {
    let (addr, _stop) = registry(0).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let s = settings(format!("http://{dead}, http://{addr}"));
    let client = RegistryClient::new(&s).expect("registry client");
    let registration = InstanceRegistration::for_bound(
        "notifications",
        "127.0.0.1:45680".parse().expect("addr"),
        &s,
    );
    client
        .register(&registration, 10)
        .await
        .expect("the second URL answers");
    client
        .heartbeat("notifications", &registration.instance_id)
        .await
        .expect("and keeps answering");
    assert_eq!(
        listing(addr, "notifications").await["instances"][0]["port"],
        45680
    );
}

#[tokio::test]
async fn discovery_follows_changes_and_keeps_the_last_known_instances_when_the_registry_dies() {
    let (addr, stop) = registry(0).await;
    let s = settings(format!("http://{addr}"));
    let client = RegistryClient::new(&s).expect("registry client");
    let shutdown = CancellationToken::new();
    let discovery = Discovery::start(client.clone(), &["Orders"], shutdown.clone());
    let mut changes = discovery.changes();

    let mut long_lease = s.clone();
    long_lease.lease_seconds = 60;
    let registration = InstanceRegistration::for_bound(
        "orders",
        "127.0.0.1:45681".parse().expect("addr"),
        &long_lease,
    );
    client.register(&registration, 60).await.expect("register");
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let now = discovery.instances("orders");
            if now.iter().any(|i| i.port == 45681 && i.is_up()) {
                return now;
            }
            let _ = changes.changed().await;
        }
    })
    .await
    .expect("discovered within a round trip");
    assert_eq!(seen[0].address, "127.0.0.1:45681");

    client
        .set_status("orders", &registration.instance_id, "DRAINING")
        .await
        .expect("drain");
    tokio::time::timeout(Duration::from_secs(5), async {
        while discovery.instances("orders").iter().any(|i| i.is_up()) {
            let _ = changes.changed().await;
        }
    })
    .await
    .expect("the status change arrives");

    let mut failures = discovery.failures();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), failures.wait_for(|n| *n > 0))
        .await
        .expect("the poller notices the registry is gone")
        .expect("discovery running");
    assert_eq!(
        discovery.instances("ORDERS").len(),
        1,
        "last known instances kept"
    );
    shutdown.cancel();
}

/// A registry out of room for blocking queries answers 503 with `Retry-After`;
/// discovery then waits as asked between polls instead of asking again at once in a
/// loop, and still learns of changes.
#[tokio::test]
async fn discovery_waits_as_asked_when_the_registry_has_no_room_to_block() {
    let (addr, _stop) = registry_with(0, |s| s.leases.max_watchers = 1).await;
    // The registry's one place, taken.
    let _watch = reqwest::get(format!("http://{addr}/api/v1/watch"))
        .await
        .expect("watch");
    let s = settings(format!("http://{addr}"));
    let client = RegistryClient::new(&s).expect("registry client");
    let shutdown = CancellationToken::new();
    let discovery = Discovery::start(client.clone(), &["orders"], shutdown.clone());
    let mut failures = discovery.failures();
    tokio::time::timeout(Duration::from_secs(10), failures.wait_for(|n| *n > 0))
        .await
        .expect("a blocking query refused")
        .expect("discovery running");
    let refused_so_far = *failures.borrow();
    // Absence of a loop can only be seen over time: two seconds, in which asking again
    // at once would be refused thousands of times, and waiting as asked (5 s) not once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = *failures.borrow() - refused_so_far;
    assert!(refused <= 1, "{refused} more refusals in two seconds");

    let mut long_lease = s.clone();
    long_lease.lease_seconds = 60;
    let registration = InstanceRegistration::for_bound(
        "orders",
        "127.0.0.1:45682".parse().expect("addr"),
        &long_lease,
    );
    client.register(&registration, 60).await.expect("register");
    let mut changes = discovery.changes();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !discovery
            .instances("orders")
            .iter()
            .any(|i| i.port == 45682)
        {
            let _ = changes.changed().await;
        }
    })
    .await
    .expect("discovered by polling, Retry-After apart");
    shutdown.cancel();
}
