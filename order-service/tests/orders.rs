//! The orders API against a real PostgreSQL (a fresh database per test), with tokens
//! signed the way the gateway signs them.

mod common;

use std::sync::Arc;

use common::spawn;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

fn book_order() -> Value {
    json!({"items": [{"sku": "BOOK-1", "quantity": 2, "unitPrice": 1250}], "currency": "EUR"})
}

#[tokio::test]
async fn an_order_is_created_with_its_event_in_the_outbox() {
    let s = spawn().await;
    let response = s.post("alice", &book_order(), None).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let order: Value = response.json().await.expect("json");
    assert_eq!(
        location,
        format!("/orders/{}", order["id"].as_str().expect("id"))
    );
    assert_eq!(order["userId"], "alice", "the owner is the token's sub");
    assert_eq!(order["status"], "PENDING");
    assert_eq!(order["total"], 2500);
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["items"], book_order()["items"]);
    assert!(order.get("rejectionReason").is_none());
    assert!(
        order["createdAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );

    let mut db = PgConnection::connect(&s.database).await.expect("connect");
    let (topic, key, event, headers): (String, String, Value, Value) = sqlx::query_as(
        "SELECT topic, key, payload, headers FROM orders.outbox WHERE published_at IS NULL",
    )
    .fetch_one(&mut db)
    .await
    .expect("one pending event");
    assert_eq!(
        (topic.as_str(), key.as_str()),
        ("order-topic", order["id"].as_str().unwrap_or_default())
    );
    assert_eq!(event["eventType"], "order-created");
    assert_eq!(event["orderId"], order["id"]);
    assert_eq!(event["userId"], "alice");
    assert_eq!(event["total"], 2500);
    assert_eq!(event["items"], order["items"]);
    assert!(event["eventId"].as_str().is_some());
    assert_eq!(headers["event-type"], "order-created");
}

#[tokio::test]
async fn a_retried_post_with_an_idempotency_key_returns_the_first_answer() {
    let s = spawn().await;
    let first: Value = s
        .post("alice", &book_order(), Some("k-1"))
        .await
        .json()
        .await
        .expect("json");
    let again = s.post("alice", &book_order(), Some("k-1")).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    let again: Value = again.json().await.expect("json");
    assert_eq!(again, first, "the very same order");
    assert_eq!(s.count("SELECT count(*) FROM orders.orders").await, 1);
    assert_eq!(s.count("SELECT count(*) FROM orders.outbox").await, 1);

    // The same key from another user is another key.
    let bobs: Value = s
        .post("bob", &book_order(), Some("k-1"))
        .await
        .json()
        .await
        .expect("json");
    assert_ne!(bobs["id"], first["id"]);

    let changed =
        json!({"items": [{"sku": "BOOK-1", "quantity": 3, "unitPrice": 1250}], "currency": "EUR"});
    let reused = s.post("alice", &changed, Some("k-1")).await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = reused.json().await.expect("problem");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("different request")
    );
}

#[tokio::test]
async fn concurrent_posts_with_one_key_create_one_order() {
    let s = Arc::new(spawn().await);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.post("alice", &book_order(), Some("same")).await.status() })
        })
        .collect();
    for task in tasks {
        let status = task.await.expect("join");
        assert!(
            status == StatusCode::CREATED || status == StatusCode::CONFLICT,
            "{status}"
        );
    }
    assert_eq!(s.count("SELECT count(*) FROM orders.orders").await, 1);
    assert_eq!(s.count("SELECT count(*) FROM orders.outbox").await, 1);
}

#[tokio::test]
async fn each_validation_rule_answers_422_naming_the_field() {
    let s = spawn().await;
    let cases = [
        (json!({"items": [], "currency": "EUR"}), "items"),
        (
            json!({"items": [{"sku": "a b", "quantity": 1, "unitPrice": 1}], "currency": "EUR"}),
            "items[0].sku",
        ),
        (
            json!({"items": [{"sku": "A", "quantity": 0, "unitPrice": 1}], "currency": "EUR"}),
            "items[0].quantity",
        ),
        (
            json!({"items": [{"sku": "A", "quantity": 1001, "unitPrice": 1}], "currency": "EUR"}),
            "items[0].quantity",
        ),
        (
            json!({"items": [{"sku": "A", "quantity": 1, "unitPrice": 0}], "currency": "EUR"}),
            "items[0].unitPrice",
        ),
        (
            json!({"items": [{"sku": "A", "quantity": 1, "unitPrice": 12.5}], "currency": "EUR"}),
            "items[0].unitPrice",
        ),
        (
            json!({"items": [{"sku": "A", "quantity": 1, "unitPrice": 1}], "currency": "EURO"}),
            "currency",
        ),
        (
            json!({"items": [{"sku": "A", "quantity": 1, "unitPrice": 1}]}),
            "currency",
        ),
        (
            json!({"items": [{"sku": "A", "quantity": 1, "unitPrice": 1}], "currency": "EUR", "userId": "bob"}),
            "userId",
        ),
    ];
    for (body, field) in cases {
        let response = s.post("alice", &body, None).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{body}"
        );
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.expect("problem");
        let fields: Vec<&str> = problem["errors"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["field"].as_str()).collect())
            .unwrap_or_default();
        assert!(fields.contains(&field), "{body}: {problem}");
    }
    let bad_key = s
        .client
        .post(format!("{}/orders", s.base))
        .bearer_auth(s.token("alice", &["customer"]))
        .header("idempotency-key", "has space")
        .json(&book_order())
        .send()
        .await
        .expect("post");
    assert_eq!(bad_key.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(s.count("SELECT count(*) FROM orders.orders").await, 0);
}

#[tokio::test]
async fn orders_are_seen_by_their_owner_and_admins_only() {
    let s = spawn().await;
    let order: Value = s
        .post("alice", &book_order(), None)
        .await
        .json()
        .await
        .expect("json");
    let path = format!("/orders/{}", order["id"].as_str().expect("id"));
    assert_eq!(
        s.get(&path, &s.token("alice", &["customer"]))
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        s.get(&path, &s.token("bob", &["customer"])).await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.get(&path, &s.token("root", &["admin"])).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.get("/orders/not-a-uuid", &s.token("alice", &["customer"]))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn the_list_is_newest_first_paged_by_cursor_and_filtered() {
    let s = spawn().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let order: Value = s
            .post("alice", &book_order(), None)
            .await
            .json()
            .await
            .expect("json");
        ids.push(order["id"].as_str().expect("id").to_owned());
    }
    s.post("bob", &book_order(), None).await;
    let alice = s.token("alice", &["customer"]);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/orders?limit=2&cursor={c}"),
            None => "/orders?limit=2".to_owned(),
        };
        let page: Value = s.get(&path, &alice).await.json().await.expect("json");
        for item in page["items"].as_array().expect("items") {
            assert_eq!(item["userId"], "alice");
            seen.push(item["id"].as_str().expect("id").to_owned());
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids, "all of alice's, newest first, each once");

    let admin: Value = s
        .get("/orders?limit=100", &s.token("root", &["admin"]))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        admin["items"].as_array().map(Vec::len),
        Some(6),
        "admins see everyone's"
    );
    let confirmed: Value = s
        .get("/orders?status=CONFIRMED", &alice)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(confirmed["items"], json!([]));

    for (query, status) in [
        ("/orders?limit=0", StatusCode::UNPROCESSABLE_ENTITY),
        ("/orders?limit=many", StatusCode::UNPROCESSABLE_ENTITY),
        ("/orders?status=SHIPPED", StatusCode::UNPROCESSABLE_ENTITY),
        ("/orders?cursor=bogus", StatusCode::UNPROCESSABLE_ENTITY),
        ("/orders?colour=red", StatusCode::BAD_REQUEST),
    ] {
        let response = s.get(query, &alice).await;
        assert_eq!(response.status(), status, "{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{query}"
        );
    }
}
