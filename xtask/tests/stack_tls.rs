//! `cargo xtask up --tls`: the gateway and the registry over HTTPS, the broker over
//! SASL_SSL with a SCRAM user, PostgreSQL with `verify-full`, all with a throwaway
//! CA that `target/stack.env` names; an order goes through the whole saga that way,
//! and kcat (Debian's, a client nobody here wrote) reads the broker with the env
//! file's settings. It runs three registry peers (`--registries 3`), which replicate
//! to each other over HTTPS too.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

mod support;
use support::{Client, Stack};

#[tokio::test(flavor = "multi_thread")]
async fn the_stack_over_tls_serves_every_part_with_its_ca_and_runs_the_saga() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stack = Stack::start_with(dir.path(), &["--tls", "--registries", "3"]);
    let ca = stack.var("STOREFRONT_CA_FILE").to_owned();
    assert_eq!(stack.var("CURL_CA_BUNDLE"), ca, "curl trusts the CA");
    for url in ["GATEWAY_URL", "REGISTRY_URL"] {
        assert!(
            stack.var(url).starts_with("https://"),
            "{url}: {}",
            stack.var(url)
        );
    }

    // Without the CA, nothing verifies the gateway's certificate.
    let untrusting = support::agent(None);
    assert!(
        untrusting
            .get(&format!("{}/actuator/health", stack.var("GATEWAY_URL")))
            .call()
            .is_err(),
        "the gateway's certificate is the stack's CA's"
    );
    let registry = support::agent(Some(Path::new(&ca)))
        .get(&format!("{}/api/v1/services", stack.var("REGISTRY_URL")))
        .call()
        .expect("the registry over https")
        .status()
        .as_u16();
    assert_eq!(registry, 200);

    // Three peers, each of which found itself in the list, reaches the two others
    // over https, and lists every service, whichever peer it registered with.
    let peers: Vec<String> = stack
        .var("REGISTRY_URLS")
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(peers.len(), 3, "{peers:?}");
    assert_eq!(peers[0], stack.var("REGISTRY_URL"));
    let trusting = support::agent(Some(Path::new(&ca)));
    for peer in &peers {
        assert!(peer.starts_with("https://"), "{peer}");
        let state: Value = trusting
            .get(&format!("{peer}/api/v1/state"))
            .call()
            .expect("a peer over https")
            .body_mut()
            .read_json()
            .expect("state");
        let states: Vec<&str> = state["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p["state"].as_str())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut listed: Value;
        loop {
            listed = trusting
                .get(&format!("{peer}/api/v1/services"))
                .call()
                .expect("services")
                .body_mut()
                .read_json()
                .expect("services json");
            let names: Vec<&str> = listed["services"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
                .unwrap_or_default();
            let all = [
                "gateway",
                "order-service",
                "payment-service",
                "notification-service",
            ]
            .iter()
            .all(|n| names.contains(n));
            if all || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(state["ready"], true, "{state}");
        assert_eq!(
            states.iter().filter(|s| **s == "self").count(),
            1,
            "{state}"
        );
        assert!(
            !states.contains(&"down"),
            "{peer} reaches its peers over https: {state}"
        );
        for service in [
            "gateway",
            "order-service",
            "payment-service",
            "notification-service",
        ] {
            assert!(
                listed.to_string().contains(&format!("\"{service}\"")),
                "{peer} lists {service}: {listed}"
            );
        }
    }

    // Through the gateway over https: a deposit and an order, paid by payment-service
    // reading and writing Kafka over SASL_SSL.
    let client = Client::of(&stack);
    let token = client.login("alice");
    let (status, body) = client.send(
        "POST",
        "/payments/accounts/me/deposits",
        Some(&token),
        Some(json!({"amount": 5_000, "currency": "EUR"})),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    let (status, order) = client.send(
        "POST",
        "/orders",
        Some(&token),
        Some(json!({"items": [{"sku": "TLS-1", "quantity": 1, "unitPrice": 1_500}], "currency": "EUR"})),
        &[],
    );
    assert_eq!(status, 201, "{order}");
    let id = order["id"].as_str().expect("id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    let settled: Value = loop {
        let (status, order) = client.send("GET", &format!("/orders/{id}"), Some(&token), None, &[]);
        assert_eq!(status, 200, "{order}");
        if order["status"] != "PENDING" {
            break order;
        }
        assert!(
            Instant::now() < deadline,
            "order {id} still PENDING after 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(settled["status"], "CONFIRMED", "{settled}");

    // PostgreSQL: the env file's URL verifies the server's certificate.
    let url = stack.var("DATABASE_URL");
    assert!(url.contains("sslmode=verify-full"), "{url}");
    let pool = sqlx::PgPool::connect(url)
        .await
        .expect("verify-full connects");
    let encrypted: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .expect("ssl");
    assert!(encrypted);

    // kcat with the env file's settings (KCAT_CONFIG: protocol, SCRAM user, CA) lists
    // the store's topics, the command line naming only the brokers.
    let kcat = std::env::var("STOREFRONT_KCAT")
        .expect("STOREFRONT_KCAT names kcat; run the tests with `cargo xtask test`");
    let listed = Command::new(kcat)
        .env("KCAT_CONFIG", stack.var("KCAT_CONFIG"))
        .args(["-b", stack.var("KAFKA_BROKERS"), "-L", "-m", "10"])
        .output()
        .expect("kcat runs");
    let said = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && said.contains("order-topic"),
        "kcat over SASL_SSL: {said}{}",
        String::from_utf8_lossy(&listed.stderr)
    );
}
