//! The whole store, end to end: `cargo xtask up` with its own PostgreSQL and broker,
//! driven only through the gateway with tokens from `/auth/token` — a deposit, an
//! order confirmed, an order rejected with its reason, the payments, the
//! notifications, the mail in the SMTP sink — and then the Postman collection under
//! `docs/postman/`, run by newman, and a short `xtask simulate`, against the same stack.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

mod support;
use support::{Client, Stack};

impl Client {
    /// Polls the order until it leaves PENDING.
    fn settled(&self, token: &str, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, order) =
                self.send("GET", &format!("/orders/{id}"), Some(token), None, &[]);
            assert_eq!(status, 200, "{order}");
            if order["status"] != "PENDING" {
                return order;
            }
            assert!(Instant::now() < deadline, "order {id} still PENDING");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls the caller's notifications until one for `order` is SENT.
    fn notified(&self, token: &str, order: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, list) = self.send("GET", "/notifications", Some(token), None, &[]);
            assert_eq!(status, 200, "{list}");
            if let Some(n) = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|n| n["orderId"] == order && n["status"] == "SENT")
            {
                return n.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no SENT notification for {order}: {list}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn mail_mentioning(maildir: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for entry in std::fs::read_dir(maildir.join("new"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(text) = std::fs::read_to_string(entry.path())
                && text.contains(needle)
            {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "no mail mentions {needle}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_store_works_end_to_end_through_the_gateway_and_the_postman_collection_passes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stack = Stack::start(dir.path());
    let client = Client::of(&stack);
    let alice = client.login("alice");
    let bob = client.login("bob");

    // A deposit, then an order it covers: confirmed.
    let (status, account) = client.send(
        "POST",
        "/payments/accounts/me/deposits",
        Some(&alice),
        Some(json!({"amount": 5_000, "currency": "EUR"})),
        &[],
    );
    assert_eq!(status, 200, "{account}");
    assert_eq!(account["balance"], 5_000);
    let (status, order) = client.send(
        "POST",
        "/orders",
        Some(&alice),
        Some(json!({"items": [{"sku": "BOOK-1", "quantity": 2, "unitPrice": 1250}], "currency": "EUR"})),
        &[("idempotency-key", "e2e-alice-1")],
    );
    assert_eq!(status, 201, "{order}");
    let confirmed_id = order["id"].as_str().expect("id").to_owned();
    assert_eq!(client.settled(&alice, &confirmed_id)["status"], "CONFIRMED");

    // An order bob cannot afford: rejected, with the reason.
    let (status, _) = client.send(
        "POST",
        "/payments/accounts/me/deposits",
        Some(&bob),
        Some(json!({"amount": 1_000, "currency": "EUR"})),
        &[],
    );
    assert_eq!(status, 200);
    let (status, order) = client.send(
        "POST",
        "/orders",
        Some(&bob),
        Some(json!({"items": [{"sku": "LAMP-7", "quantity": 1, "unitPrice": 2500}], "currency": "EUR"})),
        &[],
    );
    assert_eq!(status, 201, "{order}");
    let rejected_id = order["id"].as_str().expect("id").to_owned();
    let rejected = client.settled(&bob, &rejected_id);
    assert_eq!(rejected["status"], "REJECTED");
    assert!(
        rejected["rejectionReason"]
            .as_str()
            .is_some_and(|r| r.contains("insufficient funds")),
        "{rejected}"
    );

    // The payments, as each customer sees them.
    let (status, payments) = client.send(
        "GET",
        &format!("/payments?orderId={confirmed_id}"),
        Some(&alice),
        None,
        &[],
    );
    assert_eq!(status, 200);
    assert_eq!(payments["items"][0]["status"], "VALIDATED");
    assert_eq!(payments["items"][0]["amount"], 2_500);
    let (_, payments) = client.send(
        "GET",
        &format!("/payments?orderId={rejected_id}"),
        Some(&bob),
        None,
        &[],
    );
    assert_eq!(payments["items"][0]["status"], "DECLINED");
    let (_, account) = client.send("GET", "/payments/accounts/me", Some(&alice), None, &[]);
    assert_eq!(account["balance"], 2_500);

    // The notifications, and the mail the SMTP sink received.
    let note = client.notified(&alice, &confirmed_id);
    assert_eq!(note["channel"], "email");
    client.notified(&bob, &rejected_id);
    let maildir = Path::new(stack.var("STOREFRONT_MAILDIR"));
    let mail = mail_mentioning(maildir, &format!("Order {confirmed_id} confirmed"));
    assert!(mail.contains("alice@storefront.local"), "{mail}");
    let mail = mail_mentioning(maildir, &format!("Order {rejected_id} rejected"));
    assert!(mail.contains("insufficient funds"), "{mail}");

    // The simulator, briefly, against this stack.
    let output = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "simulate",
            "--users",
            "3",
            "--orders",
            "12",
            "--rate",
            "30",
            "--gateway",
        ])
        .arg(stack.var("GATEWAY_URL"))
        .output()
        .expect("simulate runs");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "simulate failed:\n{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let count = |label: &str| -> usize {
        report
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{label}` line:\n{report}"))
    };
    assert_eq!(count("confirmed:") + count("rejected:"), 12, "{report}");
    assert!(report.contains("POST to final status: p50"), "{report}");

    // Debian's kcat, as the README tells users, lists the stack's topics and reads an
    // order-created event from them.
    let kcat = std::env::var("STOREFRONT_KCAT")
        .expect("STOREFRONT_KCAT names Debian's kcat; run the tests with `cargo xtask test`");
    let brokers = stack.var("KAFKA_BROKERS");
    let listing = Command::new(&kcat)
        .args(["-b", brokers, "-L", "-m", "30"])
        .output()
        .expect("kcat -L runs");
    let listed = String::from_utf8_lossy(&listing.stdout);
    for topic in [
        "order-topic",
        "payment-result-topic",
        "order-topic.DLT",
        "payment-result-topic.DLT",
    ] {
        assert!(
            listed.contains(&format!("topic \"{topic}\"")),
            "kcat lists {topic}:\n{listed}"
        );
    }
    let read = Command::new(&kcat)
        .args(["-b", brokers, "-C", "-t", "order-topic", "-o", "beginning"])
        .args(["-c", "1", "-e", "-m", "30", "-f", "%h %s\n"])
        .output()
        .expect("kcat -C runs");
    let event = String::from_utf8_lossy(&read.stdout);
    assert!(
        event.contains("event-type=order-created")
            && event.contains("\"eventType\":\"order-created\""),
        "kcat reads an order-created event: {event}{}",
        String::from_utf8_lossy(&read.stderr)
    );

    // The Postman collection, as a user would run it, against this stack.
    let newman = std::env::var("STOREFRONT_NEWMAN")
        .expect("STOREFRONT_NEWMAN names newman; run the tests with `cargo xtask test`");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new(newman)
        .arg("run")
        .arg(root.join("docs/postman/storefront.postman_collection.json"))
        .arg("-e")
        .arg(root.join("docs/postman/local.postman_environment.json"))
        .args([
            "--env-var",
            &format!("gatewayUrl={}", stack.var("GATEWAY_URL")),
        ])
        .args([
            "--env-var",
            &format!("registryUrl={}", stack.var("REGISTRY_URL")),
        ])
        .args(["--reporters", "cli", "--color", "off"])
        .output()
        .expect("newman runs");
    assert!(
        output.status.success(),
        "the Postman collection failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
