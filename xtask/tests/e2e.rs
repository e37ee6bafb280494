//! The whole store, end to end: `cargo xtask up` with its own PostgreSQL and broker,
//! driven only through the gateway with tokens from `/auth/token` — a deposit, an
//! order confirmed, an order rejected with its reason, the payments, the
//! notifications, the mail in the SMTP sink — and then the Postman collection under
//! `docs/postman/`, run by newman, and a short `xtask simulate`, against the same stack.
//! The confirmed order is also followed through its timeline and, in the stack's
//! Zipkin, through its one trace.

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

/// The trace a test places its order in, and the caller's span in it.
const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";
const REQUEST_ID: &str = "e2e-order-1";

/// Reads `trace` back from Zipkin's API until `complete` accepts its spans.
fn zipkin_trace(zipkin: &str, trace: &str, complete: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut spans = Vec::new();
    loop {
        if let Ok(mut response) = agent.get(format!("{zipkin}/api/v2/trace/{trace}")).call()
            && response.status() == 200
        {
            spans = response.body_mut().read_json().unwrap_or_default();
            if complete(&spans) {
                return spans;
            }
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace} is incomplete in Zipkin:\n{}",
            outline(&spans)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One line per span: service, kind, name, id and parent.
fn outline(spans: &[Value]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} {:?} id={} parent={}",
                s["localEndpoint"]["serviceName"],
                s["kind"],
                s["name"].as_str().unwrap_or_default(),
                s["id"],
                s["parentId"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The span of `service` of `kind` whose name starts with `name` (Zipkin lowercases
/// names).
fn span_of<'a>(spans: &'a [Value], service: &str, kind: &str, name: &str) -> Option<&'a Value> {
    spans.iter().find(|s| {
        s["localEndpoint"]["serviceName"] == service
            && s["kind"] == kind
            && s["name"].as_str().is_some_and(|n| n.starts_with(name))
    })
}

/// The saga's hops, as (service, kind, name, index of the hop it must be the child of).
const HOPS: [(&str, &str, &str, Option<usize>); 10] = [
    ("gateway", "SERVER", "post", None),
    ("gateway", "CLIENT", "post order-service", Some(0)),
    ("order-service", "SERVER", "post /orders", Some(1)),
    ("order-service", "CLIENT", "insert orders", Some(2)),
    ("order-service", "PRODUCER", "order-topic publish", Some(3)),
    (
        "payment-service",
        "CONSUMER",
        "order-topic process",
        Some(4),
    ),
    (
        "payment-service",
        "PRODUCER",
        "payment-result-topic publish",
        Some(5),
    ),
    (
        "order-service",
        "CONSUMER",
        "payment-result-topic process",
        Some(6),
    ),
    (
        "notification-service",
        "CONSUMER",
        "payment-result-topic process",
        Some(6),
    ),
    ("notification-service", "CLIENT", "smtp send", Some(8)),
];

/// Every hop of one order, each the child of its cause and starting no earlier.
fn check_trace(spans: &[Value]) {
    let found: Vec<&Value> = HOPS
        .iter()
        .map(|(service, kind, name, _)| {
            span_of(spans, service, kind, name).unwrap_or_else(|| {
                panic!("no {kind} span {name:?} of {service}:\n{}", outline(spans))
            })
        })
        .collect();
    assert_eq!(
        found[0]["parentId"],
        CALLER_SPAN,
        "the gateway continues the caller's trace:\n{}",
        outline(spans)
    );
    for (index, (service, kind, name, parent)) in HOPS.iter().enumerate() {
        let Some(parent) = parent else { continue };
        let (span, cause) = (found[index], found[*parent]);
        assert_eq!(
            span["parentId"],
            cause["id"],
            "{service} {kind} {name:?} is the child of {:?}:\n{}",
            cause["name"],
            outline(spans)
        );
        // The request id travels with the events, so the consumers' log lines name it.
        if *kind == "CONSUMER" {
            assert_eq!(span["tags"]["request_id"], REQUEST_ID, "{span}");
        }
        assert!(
            span["timestamp"].as_u64() >= cause["timestamp"].as_u64(),
            "{name:?} starts after {:?}:\n{}",
            cause["name"],
            outline(spans)
        );
    }
}

/// Polls the order's timeline until it holds every step.
fn full_timeline(client: &Client, token: &str, order: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, timeline) = client.send(
            "GET",
            &format!("/orders/{order}/timeline"),
            Some(token),
            None,
            &[],
        );
        assert_eq!(status, 200, "{timeline}");
        if timeline["hops"].as_array().is_some_and(|h| h.len() == 6) {
            return timeline;
        }
        assert!(
            Instant::now() < deadline,
            "the timeline of {order} stays incomplete: {timeline}"
        );
        std::thread::sleep(Duration::from_millis(100));
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
        &[
            ("idempotency-key", "e2e-alice-1"),
            ("traceparent", &format!("00-{TRACE}-{CALLER_SPAN}-01")),
            ("x-request-id", REQUEST_ID),
        ],
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

    // The confirmed order's timeline: every hop, in saga order, for its owner and an
    // admin; nobody else learns the order exists.
    let timeline = full_timeline(&client, &alice, &confirmed_id);
    assert_eq!(timeline["orderId"], confirmed_id.as_str());
    assert_eq!(timeline["traceId"], TRACE);
    let steps: Vec<(&str, &str)> = timeline["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                h["step"].as_str().unwrap_or_default(),
                h["service"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("accepted", "order-service"),
            ("published", "order-service"),
            ("payment-decided", "payment-service"),
            ("result-published", "payment-service"),
            ("final", "order-service"),
            ("notification-sent", "notification-service"),
        ]
    );
    for hop in timeline["hops"].as_array().into_iter().flatten() {
        assert!(hop["durationMs"].as_i64().is_some_and(|d| d >= 0), "{hop}");
        assert!(
            hop["at"].as_str().is_some_and(|at| at.ends_with('Z')),
            "{hop}"
        );
    }
    assert_eq!(timeline["hops"][5]["at"], note["sentAt"], "{timeline}");
    let admin = client.login("admin");
    let (status, _) = client.send(
        "GET",
        &format!("/orders/{confirmed_id}/timeline"),
        Some(&admin),
        None,
        &[],
    );
    assert_eq!(status, 200);
    let (status, refused) = client.send(
        "GET",
        &format!("/orders/{confirmed_id}/timeline"),
        Some(&bob),
        None,
        &[],
    );
    assert_eq!(status, 404, "{refused}");

    // The same order as one trace in the stack's Zipkin: the gateway, order-service,
    // both Kafka hops, payment-service, and the mail, each the child of its cause.
    let spans = zipkin_trace(stack.var("ZIPKIN_URL"), TRACE, |spans| {
        HOPS.iter()
            .all(|(service, kind, name, _)| span_of(spans, service, kind, name).is_some())
    });
    check_trace(&spans);

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
